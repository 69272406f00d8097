"""Retrofit plans: turn Llama-family checkpoints into hf-arch variants.

A source adapter per family maps the config (``sources.py``); a conversion kind swaps or adds modules and
initialises the new parameters (``gate_insertion.py``, ``linearize.py``, ``moe_refactor.py``, ``sparsify.py``); ``api.convert`` loads, verifies and writes atomically.
"""

from .api import (
    CONVERSIONS,
    RECORD_FILE,
    ConversionKind,
    ConversionResult,
    convert,
    convert_model,
    max_abs_logit_diff,
    register_conversion,
)
from .gate_insertion import GateInsertionOptions, insert_gates
from .head_growth import SignalHeadGrowthOptions, grow_signal_heads
from .kda_linearize import KDA_CONVERSION  # registers --to kda
from .lightning_linearize import LIGHTNING_CONVERSION  # registers --to lightning
from .identity_insertion import (
    AffineInsertionOptions,
    ValueBankInsertionOptions,
    insert_affine_scale,
    insert_value_bank,
)
from .linearize import LinearizeOptions, attention_mse_per_layer, linearize
from .moe_refactor import MoERefactorOptions, refactor_moe
from .sources import SOURCE_ADAPTERS, adapter_for
from .sparsify import SparsifyOptions, load_gates, save_gates, sparsify

__all__ = [
    "SignalHeadGrowthOptions",
    "grow_signal_heads",
    "AffineInsertionOptions",
    "insert_affine_scale",
    "ValueBankInsertionOptions",
    "insert_value_bank",
    "CONVERSIONS",
    "RECORD_FILE",
    "SOURCE_ADAPTERS",
    "ConversionKind",
    "ConversionResult",
    "register_conversion",
    "GateInsertionOptions",
    "LinearizeOptions",
    "MoERefactorOptions",
    "adapter_for",
    "attention_mse_per_layer",
    "convert",
    "convert_model",
    "insert_gates",
    "linearize",
    "max_abs_logit_diff",
    "refactor_moe",
    "SparsifyOptions",
    "load_gates",
    "save_gates",
    "sparsify",
]
