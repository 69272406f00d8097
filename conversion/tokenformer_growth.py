"""``--to tokenformer --grow N``: a trained TokenFormer with ``N`` more key / value parameter tokens in every
Pattention layer, computing exactly what it computed before (``layers/pattention.py``).

The new key tokens are zero: a zero key scores 0 for every input, GeLU(0) = 0, so the new tokens weigh nothing and
leave the L2 norm over the tokens as it was; Θ's √n₀ scale stays at the counts the layers were created with (recorded
in ``mixer_options["pattention"]``). The new value tokens start as fresh tokens (normal, the config's
``initializer_range``, seeded): they weigh nothing yet, and they must not be zero too — a new key's gradient is
GeLU'(0) = ½ times its value's product with the upstream gradient, and a new value's gradient is its weight, so
with both zero neither would ever move. Training then moves the new keys at once — TokenFormer's progressive
scaling without restarting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..layers.pattention import TokenFormerOptions
from ..models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM
from .weights import build_grown

__all__ = ["TokenFormerGrowthOptions", "grow_tokenformer"]


@dataclass
class TokenFormerGrowthOptions:
    grow: int = 0  # key / value tokens added to each attention projection
    grow_ffn: int | None = None  # to each feed-forward Pattention (None: as many as ``grow``)
    seed: int = 0  # the new value tokens' init
    source_model_types = ("hfa_tokenformer",)  # class attribute (not a field): what the CLI accepts as SRC

    def validate(self) -> tuple[int, int]:
        ffn = self.grow if self.grow_ffn is None else self.grow_ffn
        for name, value in (("grow", self.grow), ("grow_ffn", ffn)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (parameter tokens to add), got {value!r}")
        if self.grow == 0 and ffn == 0:
            raise ValueError("--grow: nothing to add (grow and grow_ffn are both 0)")
        return self.grow, ffn

    def as_dict(self) -> dict:
        return asdict(self)


def grown_options(config, grow: int, grow_ffn: int) -> dict:
    """``mixer_options["pattention"]`` after growth: the counts raised, the scales pinned to the counts before."""
    options = TokenFormerOptions(**config.options_of("pattention"))
    counts = options.counts(config)
    (attention, attention_scale), (ffn, ffn_scale) = counts["attention"], counts["ffn"]
    return {"attention_param_tokens": attention + grow, "attention_scale_tokens": attention_scale,
            "ffn_param_tokens": ffn + grow_ffn, "ffn_scale_tokens": ffn_scale}


@torch.no_grad()
def grow_tokenformer(source_model, opts: TokenFormerGrowthOptions) -> TokenFormerForCausalLM:
    config = source_model.config
    if getattr(config, "model_type", None) != TokenFormerConfig.model_type:
        raise ValueError(f"--to tokenformer grows a trained hfa_tokenformer model; the source is "
                         f"{getattr(config, 'model_type', None)!r} (TokenFormer growth starts from a TokenFormer, "
                         "not from a standard checkpoint)")
    grow, grow_ffn = opts.validate()
    mixer_options = {**(config.mixer_options or {}), "pattention": grown_options(config, grow, grow_ffn)}
    grown_config = TokenFormerConfig.from_dict({**config.to_dict(), "mixer_options": mixer_options})
    grown_config._attn_implementation = config._attn_implementation
    generator = torch.Generator().manual_seed(opts.seed)
    state = {}
    for name, tensor in source_model.state_dict().items():
        if name.endswith(("key_param_tokens", "value_param_tokens")):
            added = grow_ffn if ".mlp." in name else grow
            new = torch.zeros(added, tensor.shape[1])  # keys: zero, so the function is unchanged
            if name.endswith("value_param_tokens"):
                new.normal_(0.0, config.initializer_range, generator=generator)
            tensor = torch.cat([tensor, new.to(tensor)])
        state[name] = tensor
    return build_grown(source_model, grown_config, TokenFormerForCausalLM, state)
