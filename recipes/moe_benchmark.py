"""Wall-clock benchmark of our Mixture-of-Experts layer and of MoE language-model training.

``benchmark_moe_layers`` times one MoE layer on ``tokens`` random tokens, forward (under ``torch.no_grad``) and
forward+backward (gradients into the input and every parameter; the loss is ``(out · g).sum()`` with a fixed random
``g``, so no implementation sees a stride-0 upstream gradient), for each number of experts E:

- ``hf_arch``: our :class:`~hf_arch.layers.moe.HfArchMoE` (softmax top-k router, renormalised over the k), once per
  expert backend of :func:`hf_arch.kernels.ops.expert_mlp` on the device (``torch``; also ``triton`` on CUDA),
  selected through ``HF_ARCH_KERNEL_BACKEND``;
- ``transformers_eager``: transformers' ``Qwen3MoeSparseMoeBlock`` with its eager experts loop, holding a copy of
  our router and expert weights (identical routing, so both do the same work);
- ``transformers_grouped_mm``: the same block with ``config._experts_implementation = "grouped_mm"`` (a row with
  ``skipped`` where it does not run);
- ``dense_ffn``: a dense SwiGLU :class:`~hf_arch.layers.mlp.HfArchMLP` of width ``top_k · I``: the same active
  parameters per token as one MoE layer's experts.

``benchmark_moe_training`` times training steps (forward + backward + AdamW step) of a small MoE LM against a dense
Llama with the same active parameters per token (same width, depth, heads, vocabulary; FFN width ``top_k · I``) and
against transformers' Qwen3-MoE of the same shape.

Layer timings are medians of round-robin runs of every implementation after a warm-up round
(``recipes.benchmark.interleaved_medians``); nothing here asserts a
speed. Use ``hf-arch bench moe --json`` to record numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

import torch

from .benchmark import interleaved_medians, sync_device

DEFAULT_EXPERTS = (8, 16, 64)

OURS = "hf_arch"
HF_EAGER = "transformers_eager"
HF_GROUPED = "transformers_grouped_mm"
DENSE = "dense_ffn"


def _default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def our_backends(device: str) -> list[str]:
    """Expert backends of ``expert_mlp`` to time on ``device``: ``torch``, plus ``triton`` on CUDA when present."""
    from hf_arch.kernels import ops

    available = getattr(ops, "_MOE_IMPLS", {"torch": None})
    backends = ["torch"]
    if torch.device(device).type == "cuda" and "triton" in available:
        backends.append("triton")
    return backends


@contextlib.contextmanager
def _kernel_backend(backend: str | None):
    """Route ``expert_mlp`` calls that pass no ``backend=`` (as ``HfArchExperts`` does) to ``backend``."""
    from hf_arch.kernels.dispatch import ENV_VAR

    previous = os.environ.get(ENV_VAR)
    if backend is not None:
        os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if backend is not None:
            if previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous


def default_expert_intermediate(hidden: int, top_k: int) -> int:
    """``I`` with a dense equivalent of width ``top_k · I = 4 · hidden`` (``2 · hidden`` for top-2)."""
    return max(1, 4 * hidden // top_k)


def _heads(hidden: int) -> int:
    for heads in (4, 2, 1):
        if hidden % heads == 0:
            return heads
    return 1


def _moe_config(hidden: int, experts: int, top_k: int, expert_intermediate: int, **extra):
    from hf_arch.models.moe import MoEConfig

    options = dict(hidden_size=hidden, intermediate_size=top_k * expert_intermediate, num_hidden_layers=1,
                   num_attention_heads=_heads(hidden), num_experts=experts, num_experts_per_tok=top_k,
                   moe_intermediate_size=expert_intermediate, moe_router="softmax_topk", tie_word_embeddings=False)
    options.update(extra)
    return MoEConfig(**options)


def _qwen_config(hidden: int, experts: int, top_k: int, expert_intermediate: int, implementation: str, **extra):
    from transformers import Qwen3MoeConfig

    heads = extra.pop("num_attention_heads", _heads(hidden))
    options = dict(hidden_size=hidden, moe_intermediate_size=expert_intermediate, num_experts=experts,
                   num_experts_per_tok=top_k, norm_topk_prob=True, num_attention_heads=heads,
                   num_key_value_heads=heads, head_dim=hidden // heads, decoder_sparse_step=1, mlp_only_layers=[],
                   tie_word_embeddings=False, experts_implementation=implementation)
    options.update(extra)
    return Qwen3MoeConfig(**options)


def _init_module(module: torch.nn.Module) -> torch.nn.Module:
    import transformers.initialization as init

    for sub in module.modules():
        if hasattr(sub, "init_parameters"):
            sub.init_parameters(init)
    return module


def _build_layers(hidden: int, experts: int, top_k: int, expert_intermediate: int, device, dtype, seed: int = 0):
    """``{name: module}``: our MoE layer, transformers' Qwen3-MoE blocks with copies of its weights, the dense FFN.

    Modules map ``x [1, N, H]`` to the output tensor (our layer's router logits are dropped).
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from hf_arch.layers.mlp import HfArchMLP
    from hf_arch.layers.moe import HfArchMoE

    torch.manual_seed(seed)
    config = _moe_config(hidden, experts, top_k, expert_intermediate)
    ours = _init_module(HfArchMoE(config, layer_idx=0)).to(device=device, dtype=dtype)
    blocks = {}
    for name, implementation in ((HF_EAGER, "eager"), (HF_GROUPED, "grouped_mm")):
        block = Qwen3MoeSparseMoeBlock(_qwen_config(hidden, experts, top_k, expert_intermediate, implementation))
        block = block.to(device=device, dtype=dtype)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        blocks[name] = block
    torch.manual_seed(seed + 1)
    dense = HfArchMLP(config, intermediate_size=top_k * expert_intermediate).to(device=device, dtype=dtype)
    return ours, blocks, dense


class _FirstOutput(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        out = self.module(x)
        return out[0] if isinstance(out, tuple) else out


def _layer_timers(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, device,
                  backend: str | None = None):
    """``(forward, forward_backward, check)`` closures for one implementation (``check`` raises when backward left
    the input or a parameter without a gradient)."""
    module.train()
    leaf = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward():
        with _kernel_backend(backend), torch.no_grad():
            module(x)
        sync_device(device)

    def forward_backward():
        leaf.grad = None
        for p in params:
            p.grad = None
        with _kernel_backend(backend):
            (module(leaf) * upstream).sum().backward()
        sync_device(device)

    def check():
        if leaf.grad is None or not all(p.grad is not None for p in params if p.numel()):
            raise RuntimeError("forward+backward left the input or a parameter without a gradient")

    return forward, forward_backward, check


def benchmark_moe_layers(
    experts=DEFAULT_EXPERTS,
    tokens: int = 4096,
    hidden: int = 256,
    top_k: int = 2,
    expert_intermediate: int | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    progress: bool = True,
) -> list[dict]:
    """Rows ``{layer, backend, experts, top_k, tokens, hidden, expert_intermediate, fwd_ms, fwdbwd_ms,
    fwd_tokens_per_s, fwdbwd_tokens_per_s}`` (or ``skipped`` instead of the timings) for every implementation at
    every number of experts; see the module docstring for the implementations."""
    from tqdm.auto import tqdm

    device = _default_device(device)
    I = expert_intermediate or default_expert_intermediate(hidden, top_k)
    backends = our_backends(device)
    impls = [(OURS, b) for b in backends] + [(HF_EAGER, "eager"), (HF_GROUPED, "grouped_mm"), (DENSE, "torch")]
    rows = []
    bar = tqdm(total=len(impls) * len(experts), desc="moe layers", disable=not progress)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    upstream = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    for E in experts:
        ours, blocks, dense = _build_layers(hidden, E, top_k, I, device, dtype)
        modules = {OURS: _FirstOutput(ours), HF_EAGER: blocks[HF_EAGER], HF_GROUPED: blocks[HF_GROUPED], DENSE: dense}
        rows_here, forwards, backwards, checks = {}, {}, {}, {}
        for layer, backend in impls:
            row = {"layer": layer, "backend": backend, "experts": E, "top_k": top_k, "tokens": tokens,
                   "hidden": hidden, "expert_intermediate": I, "dense_intermediate": top_k * I,
                   "device": device, "dtype": str(dtype)}
            rows_here[layer, backend] = row
            forward, forward_backward, check = _layer_timers(modules[layer], x, upstream, device,
                                                             backend if layer == OURS else None)
            try:  # one call each first: record what fails and keep going (e.g. grouped_mm unsupported here)
                forward()
                forward_backward()
                check()
            except Exception as error:
                row["skipped"] = f"{type(error).__name__}: {error}"[:200]
                continue
            forwards[layer, backend], backwards[layer, backend], checks[layer, backend] = (
                forward, forward_backward, check)
        bar.set_postfix_str(f"E={E} forward")
        fwd = interleaved_medians(forwards, repeats)
        bar.set_postfix_str(f"E={E} forward+backward")
        fwdbwd = interleaved_medians(backwards, repeats)
        for key, row in rows_here.items():
            if key in fwd:
                checks[key]()
                row.update({"fwd_ms": fwd[key] * 1e3, "fwdbwd_ms": fwdbwd[key] * 1e3,
                            "fwd_tokens_per_s": tokens / fwd[key], "fwdbwd_tokens_per_s": tokens / fwdbwd[key]})
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def _count_parameters(model: torch.nn.Module, experts: int, top_k: int) -> tuple[int, int]:
    """(total, active per token): routed expert weights (``*.experts.gate_up_proj`` / ``*.experts.down_proj``)
    count ``top_k / experts`` of their size as active."""
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        routed = name.endswith(("experts.gate_up_proj", "experts.down_proj")) and p.dim() == 3
        active += n * top_k // experts if routed else n
    return total, active


def _training_models(hidden, layers, heads, vocab_size, experts, top_k, expert_intermediate, seq_len, seed=0):
    """``[(name, build() -> model, routed?)]``: our MoE LM, the dense Llama, transformers' Qwen3-MoE (eager and
    grouped_mm experts)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeForCausalLM

    from hf_arch.models.moe import MoEForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=max(seq_len, 128), tie_word_embeddings=False)

    def ours():
        torch.manual_seed(seed)
        config = _moe_config(hidden, experts, top_k, expert_intermediate, **common)
        config._attn_implementation = "sdpa"
        return MoEForCausalLM(config)

    def llama():
        torch.manual_seed(seed)
        config = LlamaConfig(**common, intermediate_size=top_k * expert_intermediate)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    def qwen(implementation):
        def build():
            torch.manual_seed(seed)
            config = _qwen_config(hidden, experts, top_k, expert_intermediate, implementation,
                                  intermediate_size=top_k * expert_intermediate, output_router_logits=True,
                                  **common)
            config._attn_implementation = "sdpa"
            model = Qwen3MoeForCausalLM(config)
            model.config._experts_implementation = implementation
            return model

        return build

    return [("hf_arch_moe", ours, True), ("llama_dense", llama, False),
            ("qwen3_moe_eager", qwen("eager"), True), ("qwen3_moe_grouped_mm", qwen("grouped_mm"), True)]


def benchmark_moe_training(
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    experts: int = 8,
    top_k: int = 2,
    expert_intermediate: int | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    batch_size: int = 4,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
    lr: float = 1e-4,
    progress: bool = True,
) -> list[dict]:
    """Rows ``{model, tokens_per_s, step_ms, params_total, params_active, ratio_vs_dense, ...}`` (or ``skipped``).

    A step is ``zero_grad``, forward with ``labels`` (our model adds its load-balance loss, Qwen3-MoE its router
    aux loss), backward and an AdamW step, in fp32; ``step_ms`` is the median over ``steps`` steps after ``warmup``
    steps. ``ratio_vs_dense`` is tokens/s over the dense Llama's (>1 = faster than dense).
    """
    from tqdm.auto import tqdm

    device = _default_device(device)
    I = expert_intermediate or default_expert_intermediate(hidden, top_k)
    models = _training_models(hidden, layers, heads, vocab_size, experts, top_k, I, seq_len)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    bar = tqdm(total=len(models), desc="moe training", disable=not progress)
    for name, build, routed in models:
        bar.set_postfix_str(name)
        row = {"model": name, "hidden": hidden, "layers": layers, "heads": heads, "vocab_size": vocab_size,
               "experts": experts if routed else None, "top_k": top_k if routed else None,
               "ffn_intermediate": I if routed else top_k * I, "batch_size": batch_size, "seq_len": seq_len,
               "steps": steps, "device": device}
        try:
            model = build().to(device)
            total, active = _count_parameters(model, experts, top_k) if routed else _count_parameters(model, 1, 1)
            row.update(params_total=total, params_active=active)
            row.update(_time_training(model, ids, steps, warmup, lr, device))
            del model
        except Exception as error:
            row["skipped"] = f"{type(error).__name__}: {error}"[:200]
        rows.append(row)
        bar.update(1)
    bar.close()
    dense = next((r for r in rows if r["model"] == "llama_dense" and "skipped" not in r), None)
    for row in rows:
        if dense is not None and "skipped" not in row:
            row["ratio_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
    return rows


def _time_training(model, ids, steps: int, warmup: int, lr: float, device) -> dict:
    model.train()
    # Trainer's default optimizer (optim="adamw_torch_fused"); the unfused loop would overweight parameter count.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        sync_device(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite training loss: {losses}")
    step_s = statistics.median(times)
    return {"step_ms": step_s * 1e3, "tokens_per_s": ids.numel() / step_s, "final_loss": losses[-1]}


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_moe_layer_table(rows: list[dict]) -> str:
    """Markdown table; for our rows, speedups (other ms / our ms, >1 = ours faster) versus transformers' eager loop,
    its grouped_mm experts and the dense FFN of equal active size, at the same number of experts."""
    by_key = {(r["layer"], r["experts"]): r for r in rows}
    refs = [(HF_EAGER, "eager"), (HF_GROUPED, "grouped_mm"), (DENSE, "dense")]
    header = ("| layer | backend | E | k | tokens | fwd ms | fwd+bwd ms | fwd+bwd tok/s | "
              + " | ".join(f"× vs {label} fwd | × vs {label} fwd+bwd" for _, label in refs) + " |")
    columns = 8 + 2 * len(refs)
    lines = [header, "|" + "---|" * columns]
    for r in rows:
        head = f"| {r['layer']} | {r['backend']} | {r['experts']} | {r['top_k']} | {r['tokens']} | "
        if "skipped" in r:
            lines.append(head + f"skipped: {r['skipped']} |" + " |" * (columns - 6))
            continue
        speed = ["-"] * (2 * len(refs))
        if r["layer"] == OURS:
            for i, (ref, _) in enumerate(refs):
                other = by_key.get((ref, r["experts"]))
                if other and "skipped" not in other:
                    # Three significant digits: a lopsided ratio under load must not print as 0.00.
                    speed[2 * i] = f"{other['fwd_ms'] / r['fwd_ms']:.3g}"
                    speed[2 * i + 1] = f"{other['fwdbwd_ms'] / r['fwdbwd_ms']:.3g}"
        lines.append(head + f"{_fmt(r['fwd_ms'])} | {_fmt(r['fwdbwd_ms'])} | {_fmt(r['fwdbwd_tokens_per_s'], '.0f')} | "
                     + " | ".join(speed) + " |")
    return "\n".join(lines)


def format_moe_training_table(rows: list[dict]) -> str:
    """Markdown table of training throughput with parameter counts and the ratio to the dense Llama."""
    lines = ["| model | E | k | FFN width | params total | params active | step ms | tokens/s | × vs llama_dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['model']} | {_fmt(r['experts'], 'd')} | {_fmt(r['top_k'], 'd')} | {r['ffn_intermediate']} | "
                f"{_fmt(r.get('params_total'), ',d')} | {_fmt(r.get('params_active'), ',d')} | ")
        if "skipped" in r:
            lines.append(head + f"skipped: {r['skipped']} | | |")
            continue
        lines.append(head + f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {_fmt(r.get('ratio_vs_dense'))} |")
    return "\n".join(lines)
