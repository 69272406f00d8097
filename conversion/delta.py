"""``--to sparse_attention --method delta``: DELTA on a Llama-family checkpoint, no training.

Every weight is the source's (the attention projections load key for key into ``delta`` token mixers,
``layers/delta_attention.py``); what changes is which keys the layers after the dense ones attend. A query whose
context fits in the sinks, the window and the token budget attends to all of it, so the model equals the source at
short lengths; beyond, the selection layers' head-summed attention picks the keys. The result is an ``hfa_hybrid``
model (``token_mixer_types = ["delta"] * L``, ``mixer_options["delta"]``).
"""

from __future__ import annotations

from ..layers.delta_attention import DeltaOptions
from ..models.hybrid import HybridConfig, HybridForCausalLM
from .sources import adapter_for
from .weights import build_from_source


def delta_options(options, num_layers: int) -> dict:
    """``mixer_options["delta"]`` from ``SparsifyOptions``, checked once against the layer count (a bad value or
    layout is refused by name)."""
    fields = {"dense_layers": options.dense_layers, "token_budget": options.token_budget,
              "sink_tokens": options.sink_tokens, "window_tokens": options.window_tokens}
    if options.selection_layers is not None:
        fields["selection_layers"] = list(options.selection_layers)
    DeltaOptions(**fields).roles(num_layers)
    return fields


def delta_from_source(source_model, options) -> HybridForCausalLM:
    config = source_model.config
    kwargs = adapter_for(config).backbone_kwargs(config)
    sliding = [i for i, kind in enumerate(kwargs.get("layer_types") or ()) if kind != "full_attention"]
    if sliding:
        raise ValueError(f"--method delta: source layers {sliding} are not full attention (sliding window); DELTA "
                         "selects among every key of full-attention layers")
    kwargs.pop("layer_types", None)
    fields = delta_options(options, config.num_hidden_layers)
    target_config = HybridConfig(**kwargs, token_mixer_types=["delta"] * config.num_hidden_layers,
                                 mixer_options={"delta": fields})
    return build_from_source(source_model, target_config, HybridForCausalLM, lambda target: None)
