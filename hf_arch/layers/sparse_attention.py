"""Learned sparse attention on a frozen model: SeerAttention's block gate and Flux Attention's layer router.

- **Block gate** (SeerAttention, ``sparse_attn_method="seer"``): per block of ``B`` tokens, q is average-pooled and k
  max-, min- and average-pooled (before RoPE); per-head linear maps take them to the gate width, RoPE at block
  positions, then a causal softmax over key blocks gives, per (head, query block), a distribution over key blocks.
  It is trained by self-distillation: KL from the frozen layer's true attention map pooled to blocks
  (``kernels.ops.pooled_attention_scores``). At inference the gate's probabilities become a block mask (threshold,
  top-k or token budget; the first and the diagonal block always kept) and ``kernels.ops.block_sparse_attention``
  computes only those blocks. Prefill only: decode steps attend the whole cache.
- **Layer router** (Flux Attention, ``sparse_attn_method="flux"``): per input, the mean of the layer's q and k states
  → a small MLP → full attention or a sparse branch (the first ``sink`` blocks plus the last ``window`` blocks).
  Training uses a Gumbel-softmax straight-through choice and a Lagrangian penalty toward
  ``sparse_attn_target_sparsity``; the router starts biased to full attention, so the converted model is the base
  model. The choice is made on the prompt and kept for the tokens decoded after it.

Training terms and measurements leave the layer as auxiliary outputs (``layers.auxiliary``): the seer gate's KL
(``gate_loss``, in training or with ``sparse_attention_mode="gate_distillation"``) and the computed / causal blocks of
a sparse prefill (``block_counts``); flux's ``P(sparse)`` per input (``sparse_probability``) and its choice
(``sparse_choice``). ``sparse_attention_mode="dense"`` runs the base model's function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.block_sparse.naive import block_sparse_attention_weights
from ..kernels.ops import block_sparse_attention, pooled_attention_scores
from .attention import HfArchAttention, repeat_kv, weighted_values
from .auxiliary import check_sparse_attention_mode, mixer_result
from .flux_route_cache import flux_route_layer
from .mixer_registry import register_token_mixer
from .rope import apply_rotary_pos_emb

__all__ = [
    "BlockGate",
    "LayerRouter",
    "HfArchSparseAttention",
    "select_blocks",
    "sparse_attention_layers",
    "sparse_attention_auxiliary_loss",
    "flux_sparsity_penalty",
    "attention_density",
    "flux_sparse_share",
]

class _TorchInit:
    """The few ``transformers.initialization`` functions the gates use, as plain torch (for explicit re-inits, which
    transformers' versions skip on parameters already marked initialised)."""

    normal_ = staticmethod(nn.init.normal_)
    zeros_ = staticmethod(nn.init.zeros_)

    @staticmethod
    def copy_(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tensor.copy_(value)


def _pool_blocks(x: torch.Tensor, block_size: int, token: torch.Tensor | None):
    """``x [B, T, h, D]`` → (mean, max, min) over each block's real tokens, each ``[B, N, h, D]``, and the count of
    real tokens per block ``[B, N]``. Blocks without a real token pool to 0."""
    B, T, h, D = x.shape
    N = math.ceil(T / block_size)
    pad = N * block_size - T
    real = torch.ones(B, T, dtype=torch.bool, device=x.device) if token is None else token.to(torch.bool)
    x = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(B, N, block_size, h, D)
    real = F.pad(real, (0, pad)).view(B, N, block_size, 1, 1)
    count = real.sum(dim=2)  # [B, N, 1, 1]
    mean = (x * real).sum(dim=2) / count.clamp(min=1)
    maximum = x.masked_fill(~real, float("-inf")).amax(dim=2)
    minimum = x.masked_fill(~real, float("inf")).amin(dim=2)
    empty = count == 0
    return mean, maximum.masked_fill(empty, 0.0), minimum.masked_fill(empty, 0.0), count[..., 0, 0]


def _rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, N, h, d]`` at integer ``positions [N]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class BlockGate(nn.Module):
    """SeerAttention's gate: ``log p[b, h, i, j]`` over key blocks ``j <= i`` for every query block ``i``."""

    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config) -> None:
        super().__init__()
        self.block_size = config.sparse_attn_block_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        D = config.head_dim
        self.gate_dim = config.sparse_attn_gate_dim or D
        self.theta = float(getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta",
                                                                                                        10000.0))
        self.q_map = nn.Parameter(torch.empty(self.num_heads, D, self.gate_dim))
        self.k_map = nn.Parameter(torch.empty(self.num_key_value_heads, 3 * D, self.gate_dim))

    def init_parameters(self, init=_TorchInit) -> None:
        """``init``: transformers' ``initialization`` module (from ``_init_weights``) or plain torch."""
        # Unit-variance outputs for unit-variance inputs, so the initial gate is neither flat nor one-hot.
        init.normal_(self.q_map, mean=0.0, std=self.q_map.shape[1] ** -0.5)
        init.normal_(self.k_map, mean=0.0, std=self.k_map.shape[1] ** -0.5)

    def forward(self, query: torch.Tensor, key: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        """``query [B, T, H, D]``, ``key [B, T, H_kv, D]`` (before RoPE), ``token [B, T]`` (1 = real) →
        fp32 log-probabilities ``[B, H, N, N]`` (``-inf`` above the diagonal and at key blocks without a token)."""
        q_mean, _, _, q_count = _pool_blocks(query, self.block_size, token)
        k_mean, k_max, k_min, k_count = _pool_blocks(key, self.block_size, token)
        gq = torch.einsum("bnhd,hde->bnhe", q_mean, self.q_map.float())
        gk = torch.einsum("bnhd,hde->bnhe", torch.cat([k_max, k_min, k_mean], dim=-1), self.k_map.float())
        N = gq.shape[1]
        positions = torch.arange(N, device=query.device)
        gq, gk = _rope_at(gq, positions, self.theta), _rope_at(gk, positions, self.theta)
        gk = repeat_kv(gk.transpose(1, 2), self.num_heads // self.num_key_value_heads)  # [B, H, N, e]
        scores = torch.matmul(gq.transpose(1, 2), gk.transpose(-1, -2)) / math.sqrt(self.gate_dim)
        allowed = torch.ones(N, N, dtype=torch.bool, device=query.device).tril()[None, None]
        allowed = allowed & (k_count > 0)[:, None, None, :]
        # A query block whose keys are all padding (left padding) still gets a valid row: its diagonal.
        allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(N, dtype=torch.bool, device=query.device))
        return scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)


def select_blocks(gate_probs: torch.Tensor, config, context: int) -> torch.Tensor:
    """Gate probabilities ``[B, H, N, N]`` → the bool block mask to compute: threshold, top-k or token budget, plus
    the first and the diagonal block; never above the diagonal."""
    B, H, N, _ = gate_probs.shape
    device = gate_probs.device
    causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()
    selection = config.sparse_attn_selection
    if selection == "threshold":
        keep = gate_probs > config.sparse_attn_threshold
    else:
        if selection == "budget":
            if config.sparse_attn_token_budget > context:
                raise ValueError(f"sparse_attn_token_budget ({config.sparse_attn_token_budget} tokens) is larger than "
                                 f"the context ({context} tokens): nothing would be skipped; lower the budget or use "
                                 "sparse_attn_selection='threshold' / 'topk'")
            k = max(1, config.sparse_attn_token_budget // config.sparse_attn_block_size)
        else:
            k = config.sparse_attn_topk
        k = min(k, N)
        top = gate_probs.topk(k, dim=-1).indices
        keep = torch.zeros_like(gate_probs, dtype=torch.bool).scatter_(-1, top, True)
    keep = keep | torch.eye(N, dtype=torch.bool, device=device)
    keep[..., 0] = True
    return keep & causal


class LayerRouter(nn.Module):
    """Flux's per-layer router: mean q/k states of the input → MLP → logits ``[B, 2]`` for (full, sparse).

    Parameters are held directly (not in ``nn.Linear`` children) so ``_init_weights`` reaches them."""

    new_parameters = ("*",)  # read by peft_utils

    def __init__(self, config) -> None:
        super().__init__()
        features = (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
        hidden = config.sparse_attn_router_hidden
        self.hidden_weight = nn.Parameter(torch.empty(hidden, features))
        self.hidden_bias = nn.Parameter(torch.empty(hidden))
        self.out_weight = nn.Parameter(torch.empty(2, hidden))
        self.out_bias = nn.Parameter(torch.empty(2))
        self._bias = config.sparse_attn_router_bias

    def init_parameters(self, init=_TorchInit) -> None:
        # The last layer starts at zero with a bias toward full attention: the converted model is the base model.
        init.normal_(self.hidden_weight, mean=0.0, std=self.hidden_weight.shape[1] ** -0.5)
        init.zeros_(self.hidden_bias)
        init.zeros_(self.out_weight)
        init.copy_(self.out_bias, torch.tensor([self._bias, 0.0]))

    def forward(self, query: torch.Tensor, key: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        B = query.shape[0]
        features = torch.cat([query.reshape(B, query.shape[1], -1), key.reshape(B, key.shape[1], -1)], dim=-1).float()
        if token is None:
            pooled = features.mean(dim=1)
        else:
            weight = token.to(torch.float32)[..., None]
            pooled = (features * weight).sum(1) / weight.sum(1).clamp(min=1)
        hidden = F.silu(F.linear(pooled, self.hidden_weight.float(), self.hidden_bias.float()))
        return F.linear(hidden, self.out_weight.float(), self.out_bias.float())


def sink_window_block_mask(num_blocks: int, config, batch: int, heads: int, device) -> torch.Tensor:
    """Flux's sparse branch as a block mask: key blocks ``j < sink`` or ``i - window < j <= i``."""
    i = torch.arange(num_blocks, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    keep = (j <= i) & ((j < config.sparse_attn_sink_blocks) | (j > i - config.sparse_attn_window_blocks))
    return keep[None, None].expand(batch, heads, num_blocks, num_blocks)


@register_token_mixer("sparse_attention")
class HfArchSparseAttention(HfArchAttention):
    """Softmax attention plus a block gate (seer) or a layer router (flux); q/k/v/o keep the source's names."""

    layer_types = ("full_attention",)
    attention_features = ("output_gate",)  # the other scores / features do not combine with a sparse layout

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.method = config.sparse_attn_method
        self.block_size = config.sparse_attn_block_size
        self.block_gate = BlockGate(config) if self.method == "seer" else None
        self.layer_router = LayerRouter(config) if self.method == "flux" else None

    def init_parameters(self, init=_TorchInit) -> None:
        for module in (self.block_gate, self.layer_router):
            if module is not None:
                module.init_parameters(init)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cu_seqlens=None,
        position_in_sequence=None,
        padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        sparse_attention_mode: str | None = None,
        attention_transfer: bool = False,
        **kwargs,
    ) -> tuple:
        """``padding_mask``: the 2-D ``[B, past + T]`` mask (1 = token) the backbone passes to sparse layers;
        ``sparse_attention_mode``: None, ``"dense"`` (the base model's function) or ``"gate_distillation"`` (seer:
        attend densely, report the gate's KL). Returns ``(output, weights)`` plus, when there is any, the auxiliary
        dict (``gate_loss``, ``block_counts``, ``sparse_probability``, ``sparse_choice``)."""
        check_sparse_attention_mode(sparse_attention_mode)
        if cu_seqlens is not None and past_key_values is None:  # packed rows: blocks and routes per sequence
            return self.forward_per_sequence(hidden_states, position_embeddings, attention_mask, cu_seqlens,
                                             output_attentions=output_attentions,
                                             sparse_attention_mode=sparse_attention_mode, **kwargs)
        B, T, _ = hidden_states.shape
        query, key, value = self.project(hidden_states)
        rq, rk = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        token = padding_mask[:, -T:] if padding_mask is not None else None

        def dense():
            return self.attend(rq, rk, value.transpose(1, 2), attention_mask, past_key_values, **kwargs)

        # T first: a decode step is decided by its shape, never by the (static caches': tensor) cache length.
        distilling = sparse_attention_mode == "gate_distillation" and self.method == "seer"
        if sparse_attention_mode == "dense" or (
                self.method == "seer" and not distilling and (T < self.block_size or past)):
            out, weights = dense()
            return self.finish(hidden_states, out), weights
        if self.method == "seer":
            if distilling:
                return self._distill_gate(hidden_states, query, key, rq, rk, token, dense)
            learning = self.training  # (not is_grad_enabled: a reentrant checkpoint runs the first pass without)
            # The gate sees detached q/k: its loss trains the gate only, never the attention it imitates.
            log_probs = self.block_gate(query.detach(), key.detach(), token) if learning else \
                self.block_gate(query, key, token)
            mask = select_blocks(log_probs.exp(), self.config, T)
            auxiliary = {"block_counts": self._block_counts(mask)}
            if learning:  # SeerAttention's self-distillation, alongside whatever loss trains the model
                auxiliary["gate_loss"] = gate_kl(self._gate_target(rq, rk, token), log_probs, token, self.block_size)
            if past_key_values is not None:
                past_key_values.update(rk, value.transpose(1, 2), self.layer_idx)
            if output_attentions:  # the block-sparse maps, with the output computed from them (gradients reach them)
                weights = block_sparse_attention_weights(rq.transpose(1, 2), rk.transpose(1, 2), mask, self.block_size,
                                                         self.scaling, token).to(rq.dtype)
                out = self.finish(hidden_states, weighted_values(weights, value.transpose(1, 2)))
                return mixer_result(out, weights, auxiliary)
            out = self._block_sparse(rq, rk, value, mask, token)
            return mixer_result(self.finish(hidden_states, out), None, auxiliary)
        return self._flux(hidden_states, query, key, value, rq, rk, token, padding_mask, past, past_key_values, dense)

    # -- seer -----------------------------------------------------------------------------------------------------
    def _block_sparse(self, rq, rk, value, mask, token):
        return block_sparse_attention(rq.transpose(1, 2), rk.transpose(1, 2), value, mask, self.block_size,
                                      scale=self.scaling, attention_mask=token)

    def _distill_gate(self, hidden_states, query, key, rq, rk, token, dense):
        T = hidden_states.shape[1]
        if T < self.block_size:
            raise ValueError(f"layer {self.layer_idx}: gate distillation needs at least one block of context "
                             f"(sparse_attn_block_size={self.block_size}), got {T} tokens")
        log_gate = self.block_gate(query.detach(), key.detach(), token)
        gate_loss = gate_kl(self._gate_target(rq, rk, token), log_gate, token, self.block_size)
        out, weights = dense()
        return mixer_result(self.finish(hidden_states, out), weights, {"gate_loss": gate_loss})

    @torch.no_grad()
    def _gate_target(self, rq, rk, token):
        """What the gate learns to predict: the dense attention mass per (query block, key block)."""
        return pooled_attention_scores(rq.transpose(1, 2), rk.transpose(1, 2), self.block_size, scale=self.scaling,
                                       attention_mask=token)

    @staticmethod
    def _block_counts(mask) -> torch.Tensor:
        """``[2]`` long: the blocks a prefill computes and the causal blocks dense attention would (no host sync)."""
        N = mask.shape[-1]
        causal = mask.shape[0] * mask.shape[1] * N * (N + 1) // 2
        return torch.stack([mask.sum(), torch.tensor(causal, device=mask.device)])

    # -- flux -----------------------------------------------------------------------------------------------------
    def _flux(self, hidden_states, query, key, value, rq, rk, token, padding_mask, past, past_key_values, dense):
        B, T = hidden_states.shape[:2]
        layer = flux_route_layer(past_key_values, self.layer_idx) if past_key_values is not None else None
        # Decoding = continuing a cache whose prompt was routed (not a test of the cache length, which a static cache
        # holds as a tensor a traced graph cannot branch on).
        decoding = layer is not None and layer.route is not None
        auxiliary = {}
        if decoding:
            sparse = layer.route  # decided on the prompt
            soft = None
        else:
            logits = self.layer_router(query, key, token)
            auxiliary["sparse_probability"] = logits.softmax(-1)[:, 1]
            if self.training:
                soft = F.gumbel_softmax(logits, tau=self.config.sparse_attn_gumbel_tau, hard=True)[:, 1]
                sparse = soft.detach() > 0.5
            else:
                soft, sparse = None, logits[:, 1] > logits[:, 0]
            if layer is not None:
                layer.route = sparse
        auxiliary["sparse_choice"] = sparse
        # Skipping the sparse branch when no input takes it is a host-side decision: a traced graph runs both.
        if soft is None and not torch.compiler.is_compiling() and not bool(sparse.any()):
            out, weights = dense()
            return mixer_result(self.finish(hidden_states, out), weights, auxiliary)
        full_out, weights = dense()  # also appends k/v to the cache, which the sparse branch then reads
        # Over the cache when continuing one (a routed prompt, or a prompt chunk after others: eager only).
        if decoding or (not torch.compiler.is_compiling() and past):
            sparse_out = self._sink_window_over_cache(rq, past_key_values, past, padding_mask)
        else:
            N = math.ceil(T / self.block_size)
            mask = sink_window_block_mask(N, self.config, B, self.num_heads, hidden_states.device)
            sparse_out = self._block_sparse(rq, rk, value, mask, token)
        if soft is not None:  # straight-through: the forward uses the hard choice, the gradient the soft one
            w = soft.to(full_out.dtype)[:, None, None, None]
            out = w * sparse_out.to(full_out.dtype) + (1 - w) * full_out
        else:
            out = torch.where(sparse[:, None, None, None], sparse_out.to(full_out.dtype), full_out)
        return mixer_result(self.finish(hidden_states, out), weights, auxiliary)

    def _sink_window_over_cache(self, rq, past_key_values, past, padding_mask):
        """Decode steps of the sparse branch: the new queries attend the cached sink and window blocks."""
        keys = past_key_values.layers[self.layer_idx].keys
        values = past_key_values.layers[self.layer_idx].values
        T, S = rq.shape[2], keys.shape[2]
        query_pos = (torch.arange(T, device=rq.device) + past)[:, None]
        t = query_pos // self.block_size
        s = torch.arange(S, device=rq.device)[None, :]
        sb = s // self.block_size
        allowed = (s <= query_pos) & (
            (sb < self.config.sparse_attn_sink_blocks) | (sb > t - self.config.sparse_attn_window_blocks))
        allowed = allowed[None, None]
        if padding_mask is not None:  # padded cache entries are never attended
            real = padding_mask[:, :S].to(torch.bool)
            real = F.pad(real, (0, S - real.shape[-1]), value=False)  # a static cache's slots past the mask: empty
            allowed = allowed & real[:, None, None, :]
        k = repeat_kv(keys, self.num_key_value_groups)
        v = repeat_kv(values, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(rq, k.to(rq.dtype), v.to(rq.dtype), attn_mask=allowed,
                                             scale=self.scaling)
        return out.transpose(1, 2)


def gate_kl(target: torch.Tensor, log_gate: torch.Tensor, token: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """``KL(target ‖ gate)`` per (head, query block), averaged over query blocks that hold a real token."""
    terms = torch.special.xlogy(target, target) - torch.where(target > 0, target * log_gate,
                                                              torch.zeros_like(target))
    kl = terms.sum(-1)  # [B, H, N]
    if token is None:
        return kl.mean()
    B, T = token.shape
    N = kl.shape[-1]
    real = F.pad(token.to(torch.bool), (0, N * block_size - T)).view(B, N, block_size).any(-1)  # [B, N]
    weight = real[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * weight).sum() / weight.sum().clamp(min=1)


def sparse_attention_layers(model: nn.Module) -> list[HfArchSparseAttention]:
    return [m for m in model.modules() if isinstance(m, HfArchSparseAttention)]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def sparse_attention_auxiliary_loss(gate_losses, sparse_probabilities, multipliers: torch.Tensor | None,
                                    target: float) -> torch.Tensor | None:
    """What a loss adds for sparse-attention layers, so every parameter they own learns from the loss the model
    returns: the mean block-gate self-distillation KL over the seer layers (gradients reach the gates only) plus the
    Flux sparsity Lagrangian (routers and multipliers; pass no probabilities outside training). The terms come from
    the decoder layers' outputs, so they survive gradient checkpointing. None when neither applies."""
    terms = []
    if gate_losses:
        terms.append(torch.stack(gate_losses).mean())
    if multipliers is not None and sparse_probabilities:
        terms.append(flux_sparsity_penalty(sparse_probabilities, multipliers, target))
    return sum(terms[1:], terms[0]) if terms else None


def flux_sparsity_penalty(sparse_probabilities, multipliers: torch.Tensor, target: float) -> torch.Tensor:
    """PruLong-style Lagrangian ``λ₁(s − t) + λ₂(s − t)²`` with ``s`` the mean of the routers' ``P(sparse)`` (one
    ``[B]`` tensor per flux layer). The multipliers see a reversed gradient, so one minimiser ascends on λ while it
    descends on the routers."""
    gap = torch.cat(list(sparse_probabilities)).mean() - target
    lam = _ReverseGradient.apply(multipliers.float())
    return lam[0] * gap + lam[1] * gap * gap


def flux_sparse_share(outputs) -> float | None:
    """Share of (layer, input) choices that went to the sparse branch in the forward that returned ``outputs`` (its
    ``sparse_choices``); None without flux layers."""
    choices = getattr(outputs, "sparse_choices", None)
    if not choices:
        return None
    return float(torch.cat([c.float().reshape(-1) for c in choices]).mean())


def attention_density(outputs) -> float | None:
    """Computed / causal blocks over the seer layers that prefilled sparsely in the forward that returned ``outputs``
    (its ``sparse_block_counts``; 1.0 = dense); None when none did."""
    counts = getattr(outputs, "sparse_block_counts", None)
    if not counts:
        return None
    total = torch.stack(list(counts)).sum(0)
    return int(total[0]) / int(total[1])
