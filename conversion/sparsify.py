"""Sparse attention on a frozen checkpoint: a Llama-family model → ``hfa_sparse_attention`` (learned: seer, flux) or
``hfa_hybrid`` with DELTA layers (``method="delta"``, training-free: ``conversion/delta.py``).

Every source weight is copied unchanged; what is added is SeerAttention's block gates (``method="seer"``) or Flux's
layer routers (``method="flux"``). Flux starts biased to full attention, so the converted model equals the source;
Seer's gates start random, so prefill over at least a block of context is sparse only after distillation (with the
default threshold the untrained gate keeps nearly every block).

Gates travel like adapters: ``save_gates`` writes only the new parameters with a ``base_model`` pointer and a
fingerprint of the base weights; ``load_gates`` rebuilds the model from the base and refuses a base that does not
match.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.sparse_attention import SparseAttentionConfig, SparseAttentionForCausalLM
from ..peft_utils import new_parameter_names
from .checkpoint_io import atomic_output_dir
from .sources import adapter_for, takes_source_families
from .weights import build_from_source

METHODS = ("seer", "flux", "delta")
GATES_WEIGHTS = "gates.safetensors"
GATES_CONFIG = "gates_config.json"


@dataclass
class SparsifyOptions:
    method: str = "seer"
    block_size: int = 64
    gate_dim: int | None = None  # seer: None = head_dim
    selection: str = "threshold"  # seer: threshold | topk | budget
    threshold: float = 5e-3
    topk: int = 8
    token_budget: int = 512  # seer budget selection: tokens per query block; delta: salient keys per query
    router_hidden: int = 64  # flux
    router_bias: float = 4.5  # flux: logit advantage of full attention at init
    sink_blocks: int = 1  # flux sparse branch
    window_blocks: int = 4
    gumbel_tau: float = 1.0
    target_sparsity: float = 0.5
    lagrangian_lr_scale: float = 10.0  # flux: recipes train the Lagrange multipliers at this × the learning rate
    seed: int = 0  # the gates' / routers' random init
    # delta: the first dense_layers keep full attention; selection layers (None: the first after them and the middle
    # one) choose token_budget keys per query, plus sink_tokens and the last window_tokens
    dense_layers: int = 2
    selection_layers: list[int] | None = None
    sink_tokens: int = 4
    window_tokens: int = 64

    DELTA_FIELDS = ("dense_layers", "selection_layers", "sink_tokens", "window_tokens")

    def config_overrides(self) -> dict:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} for --to sparse_attention, got {self.method!r}")
        return {f"sparse_attn_{name}": value for name, value in asdict(self).items()
                if name != "seed" and name not in self.DELTA_FIELDS}

    def as_dict(self) -> dict:
        return asdict(self)


def sparse_attention_config_from(source_config, options: SparsifyOptions) -> SparseAttentionConfig:
    # Sliding-window layers of a source (Mistral, Qwen2) stay as they are; gates go to its full-attention layers.
    kwargs = adapter_for(source_config).backbone_kwargs(source_config)
    return SparseAttentionConfig(**kwargs, **options.config_overrides())


@takes_source_families
def sparsify(source_model, options: SparsifyOptions | None = None) -> SparseAttentionForCausalLM:
    """Build the sparse-attention model from an in-memory source (same dtype), copying and checking every weight."""
    options = options or SparsifyOptions()
    if options.method == "delta":
        from .delta import delta_from_source

        return delta_from_source(source_model, options)

    def init_new(target) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded gates, the caller's RNG untouched
            torch.manual_seed(options.seed)
            _reset_new_parameters(target)

    config = sparse_attention_config_from(source_model.config, options)
    return build_from_source(source_model, config, SparseAttentionForCausalLM, init_new)


def _reset_new_parameters(model) -> None:
    """Explicit: never rely on load-time init for the gates and routers."""
    from ..layers.sparse_attention import sparse_attention_layers

    for layer in sparse_attention_layers(model):
        layer.init_parameters()
    if model.model.sparsity_multipliers is not None:
        model.model.sparsity_multipliers.zero_()


# -- gates checkpoints (adapter-style) ---------------------------------------------------------------------------

def base_fingerprint(model) -> dict:
    """What a gates checkpoint checks its base against: the shapes that matter and a checksum of the attention
    weights (sum of |w| over every q/k projection; equal to ~1e-4 relative across dtypes of the same weights)."""
    config = model.config
    checksum = 0.0
    for name, tensor in model.state_dict().items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            checksum += float(tensor.double().abs().sum())
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "qk_abs_sum": checksum,
    }


def save_gates(model, out: str | Path, base_model: str, overwrite: bool = False) -> Path:
    """Write only the gates / routers of ``model`` (a ``hfa_sparse_attention`` model) with a pointer to its base."""
    from safetensors.torch import save_file

    if getattr(model.config, "model_type", None) != SparseAttentionConfig.model_type:
        raise ValueError(f"save_gates needs a {SparseAttentionConfig.model_type} model, got "
                         f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
    names = set(new_parameter_names(model))
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
               if name in names}
    fields = {k: v for k, v in model.config.to_dict().items() if k.startswith("sparse_attn_")}
    record = {"base_model": str(base_model), "base_fingerprint": base_fingerprint(model), "sparse_attention": fields,
              "parameters": sorted(tensors)}
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / GATES_WEIGHTS))
        (tmp / GATES_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    return out


def gates_record(gates_dir: str | Path) -> dict:
    """The ``gates_config.json`` of a gates checkpoint (base pointer, fingerprint, sparse fields)."""
    record_path = Path(gates_dir) / GATES_CONFIG
    if not record_path.is_file():
        raise FileNotFoundError(f"{gates_dir} is not a gates checkpoint: {GATES_CONFIG} is missing")
    return json.loads(record_path.read_text())


def load_gates(gates_dir: str | Path, base_model=None, dtype: torch.dtype = torch.float32):
    """Rebuild the sparse-attention model: the base (``base_model``: a loaded model, a path or a Hub id; default
    the one the gates were saved with) plus the saved gates. Refuses a base whose fingerprint differs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gates_dir = Path(gates_dir)
    record = gates_record(gates_dir)
    base = base_model if base_model is not None else record["base_model"]
    if isinstance(base, (str, Path)):
        base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    known = set(SparsifyOptions.__dataclass_fields__)
    fields = {k[len("sparse_attn_"):]: v for k, v in record["sparse_attention"].items()
              if k[len("sparse_attn_"):] in known}
    model = sparsify(base, SparsifyOptions(**fields))
    expected, found = record["base_fingerprint"], base_fingerprint(model)
    problems = [f"{key}: gates were trained on {expected[key]}, this base has {found[key]}"
                for key in expected if key != "qk_abs_sum" and expected[key] != found.get(key)]
    if not problems and abs(found["qk_abs_sum"] - expected["qk_abs_sum"]) > 1e-3 * max(abs(expected["qk_abs_sum"]), 1):
        problems.append(f"attention weights differ (|q|+|k| sum {found['qk_abs_sum']:.6g} vs "
                        f"{expected['qk_abs_sum']:.6g} when the gates were trained)")
    if problems:
        raise ValueError(f"gates {gates_dir} do not match the base model "
                         f"({record['base_model'] if base_model is None else 'given'}): " + "; ".join(problems))
    tensors = load_file(str(gates_dir / GATES_WEIGHTS))
    state = model.state_dict()
    missing = sorted(set(new_parameter_names(model)) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(f"gates {gates_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if state[name].shape != tensor.shape:
                raise ValueError(f"gates {gates_dir}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(state[name].shape)}")
            state[name].copy_(tensor)
    return model.eval()
