"""Wall-clock benchmark of the sequence-mixing kernels and of cached decoding.

``benchmark_kernels`` times forward (under ``torch.no_grad``) and forward+backward of our ops (``gated_delta_rule``,
``gla``, ``sliding_window_attention``) against PyTorch SDPA causal attention and transformers' own pure-PyTorch
gated-delta-rule fallback (``torch_chunk_gated_delta_rule`` from Qwen3-Next), over a range of sequence lengths.
On CUDA it also times our Triton backends and fla's kernels (through our adapter) where fla-core >= 0.6 is installed.

``benchmark_decode`` times per-token cached decoding of a random-init Gated DeltaNet LM against a Llama of the same
width, depth, heads and vocabulary, after prefilling contexts of several lengths.

A kernel package adds its own rows without editing this file: ``hf_arch/kernels/<op>/benchmark.py`` defines
``kernel_benchmark_impls(device) -> [(op, impl, prepare, run), ...]`` over the shared inputs of ``_make_inputs``
(``registered_kernel_impls`` finds them); our rows are compared with the same op's ``transformers`` row.

Timings are medians over ``repeats`` after one warm-up (``recipes.benchmark._median_seconds``); nothing here
asserts a speed. Use ``hf-arch bench kernels --json`` to record numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import statistics
import time

import torch
import torch.nn.functional as F

from .benchmark import _median_seconds, sync_device, timed_greedy_decode

DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)

OURS = "hf_arch"
HF_FALLBACK = "transformers"
SDPA = "sdpa"


def _make_inputs(T: int, batch: int, heads: int, head_dim: int, device, dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    shape = (batch, T, heads, head_dim)
    return {
        "q": randn(*shape),
        "k": randn(*shape),
        "v": randn(*shape),
        "g_gla": F.logsigmoid(randn(*shape).float()).div(16).to(dtype),  # per-channel log decay (GLA's τ = 16)
        "g_gdn": F.logsigmoid(randn(batch, T, heads).float()).to(dtype),  # per-head log decay
        "beta": torch.sigmoid(randn(batch, T, heads).float()).to(dtype),
    }


def _impls(device: str, windows: tuple[int, ...]) -> list[tuple[str, str, object, object]]:
    """``(op, impl, prepare(inputs) -> tensors, run(tensors) -> outputs)``; grads flow into the q/k/v tensors."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from hf_arch.kernels import ops

    def btdh(x):  # q, k, v in [B, T, H, D]
        return {"q": x["q"], "k": x["k"], "v": x["v"], "g_gla": x["g_gla"], "g_gdn": x["g_gdn"], "beta": x["beta"]}

    def bhtd(x):  # SDPA layout [B, H, T, D], contiguous
        return {name: x[name].transpose(1, 2).contiguous() for name in ("q", "k", "v")}

    def ours_gdr(backend):
        return lambda t: ops.gated_delta_rule(t["q"], t["k"], t["v"], t["g_gdn"], t["beta"], output_final_state=True,
                                              use_qk_l2norm=True, backend=backend)

    def ours_gla(backend):
        return lambda t: ops.gla(t["q"], t["k"], t["v"], t["g_gla"], output_final_state=True, backend=backend)

    def ours_swa(backend, window):
        return lambda t: ops.sliding_window_attention(t["q"], t["k"], t["v"], window, backend=backend)

    def liger_layer(window):  # a Liger hybrid layer's two kernels on shared q/k/v: GLA plus the window branch
        def run(t):
            linear, _ = ops.gla(t["q"], t["k"], t["v"], t["g_gla"])
            return linear + ops.sliding_window_attention(t["q"], t["k"], t["v"], window)

        return run

    def hf_gdr(t):
        return torch_chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g_gdn"], t["beta"], output_final_state=True,
                                            use_qk_l2norm_in_kernel=True)

    def sdpa(t):
        return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)

    cuda = torch.device(device).type == "cuda"
    impls = [("gated_delta_rule", f"{OURS}.torch", btdh, ours_gdr("torch"))]
    if cuda:
        impls.append(("gated_delta_rule", f"{OURS}.triton", btdh, ours_gdr("triton")))
    impls.append(("gated_delta_rule", HF_FALLBACK, btdh, hf_gdr))
    impls.append(("gla", f"{OURS}.torch", btdh, ours_gla("torch")))
    if cuda:
        impls.append(("gla", f"{OURS}.triton", btdh, ours_gla("triton")))
    for window in windows:  # the window in the impl name: one row per window at each T
        impls.append(("sliding_window_attention", f"{OURS}.torch w={window}", btdh, ours_swa("torch", window)))
        if cuda:
            impls.append(("sliding_window_attention", f"{OURS}.triton w={window}", btdh, ours_swa("triton", window)))
        impls.append(("liger_hybrid", f"{OURS} w={window}", btdh, liger_layer(window)))
    impls.append(("causal_attention", SDPA, bhtd, sdpa))
    if cuda:  # fla's chunked kernels through our adapter (kernels/fla_backend.py), where a usable fla is installed
        if "fla" in ops._GDR_IMPLS:
            impls.append(("gated_delta_rule", "fla", btdh, ours_gdr("fla")))
        if "fla" in ops._GLA_IMPLS:
            impls.append(("gla", "fla", btdh, ours_gla("fla")))
    return impls + registered_kernel_impls(device)


def registered_kernel_impls(device: str) -> list[tuple[str, str, object, object]]:
    """The rows every ``hf_arch.kernels.<op>.benchmark`` module declares (``kernel_benchmark_impls(device)``)."""
    from hf_arch import kernels

    impls = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda i: i.name):
        name = f"{kernels.__name__}.{info.name}.benchmark"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            impls += importlib.import_module(name).kernel_benchmark_impls(device)
    return impls


def _loss(out) -> torch.Tensor:
    if isinstance(out, tuple):
        o, state = out[0], out[1] if len(out) > 1 else None
    else:
        o, state = out, None
    loss = o.float().sum()
    if state is not None:
        loss = loss + state.float().sum()
    return loss


def benchmark_kernels(
    seq_lens=DEFAULT_SEQ_LENS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    device: str = "cpu",
    repeats: int = 3,
    windows: tuple[int, ...] = (64,),
    time_budget_s: float | None = None,
    per_call_limit_s: float = 20.0,
    progress: bool = True,
    ops: tuple[str, ...] | None = None,
) -> list[dict]:
    """Rows ``{op, impl, T, fwd_ms, fwdbwd_ms}`` (or ``{op, impl, T, skipped}``) for every impl at every length
    (``ops``: only these ops).

    An impl whose forward or forward+backward took more than ``per_call_limit_s`` at some T is skipped at longer
    T; with ``time_budget_s`` everything left once the budget is spent is skipped too.
    """
    from tqdm.auto import tqdm

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    impls = _impls(device, tuple(windows))
    if ops is not None:
        unknown = sorted(set(ops) - {op for op, *_ in impls})
        if unknown:
            raise ValueError(f"ops {unknown} have no kernel benchmark; known: {sorted({op for op, *_ in impls})}")
        impls = [impl for impl in impls if impl[0] in ops]
    too_slow: dict[tuple[str, str], int] = {}
    rows = []
    start = time.perf_counter()
    bar = tqdm(total=len(impls) * len(seq_lens), desc="kernels", disable=not progress)
    for T in seq_lens:
        base = _make_inputs(T, batch, heads, head_dim, device, dtype)
        for op, impl, prepare, run in impls:
            bar.set_postfix_str(f"{op}/{impl} T={T}")
            row = {"op": op, "impl": impl, "T": T, "B": batch, "H": heads, "D": head_dim, "dtype": str(dtype)}
            if (op, impl) in too_slow:
                row["skipped"] = f"a call took > {per_call_limit_s:g} s at T={too_slow[(op, impl)]}"
            elif time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                row["skipped"] = f"time budget of {time_budget_s:g} s spent"
            else:
                try:
                    row.update(_time_impl(prepare, run, base, device, repeats))
                except Exception as error:  # record, keep going (e.g. out of memory at long T)
                    row["skipped"] = f"{type(error).__name__}: {error}"[:200]
                if max(row.get("fwd_ms", 0.0), row.get("fwdbwd_ms", 0.0)) > per_call_limit_s * 1e3:
                    too_slow[(op, impl)] = T
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def _time_impl(prepare, run, base: dict, device, repeats: int) -> dict:
    tensors = prepare(base)
    with torch.no_grad():
        def forward():
            run(tensors)
            sync_device(device)

        fwd = _median_seconds(forward, repeats)

    grads = {name: tensors[name].detach().clone().requires_grad_(True) for name in ("q", "k", "v")}
    tensors = {**tensors, **grads}

    def forward_backward():
        for leaf in grads.values():
            leaf.grad = None
        _loss(run(tensors)).backward()
        sync_device(device)

    fwdbwd = _median_seconds(forward_backward, repeats)
    return {"fwd_ms": fwd * 1e3, "fwdbwd_ms": fwdbwd * 1e3}


def _decode_models(hidden_size: int, layers: int, heads: int, vocab_size: int, seed: int = 0) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_arch import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads)
    torch.manual_seed(seed)
    gdn = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**common, layer_types=["linear_attention"] * layers))
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=1 << 16))
    llama.config._attn_implementation = "sdpa"
    return {"gated_deltanet": gdn.eval(), "llama_sdpa": llama.eval()}


def benchmark_decode(
    contexts=(512, 2048, 8192),
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    new_tokens: int = 16,
    repeats: int = 3,
    vocab_size: int = 1024,
    progress: bool = True,
) -> list[dict]:
    """Rows ``{model, context, ms_per_token}``: per-token cached decode after prefilling ``context`` tokens.

    Each repeat prefills the context once (not timed) and then times ``new_tokens`` consecutive one-token steps
    fed with the returned cache; the first repeat is a warm-up. Median over ``repeats``.
    """
    from tqdm.auto import tqdm

    models = _decode_models(hidden_size, layers, heads, vocab_size)
    rows = []
    bar = tqdm(total=len(models) * len(contexts), desc="decode", disable=not progress)
    for context in contexts:
        ids = torch.randint(0, vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        for name, model in models.items():
            bar.set_postfix_str(f"{name} ctx={context}")
            times = []
            with torch.no_grad():
                for _ in range(repeats + 1):
                    times.append(timed_greedy_decode(model, model(ids, use_cache=True), new_tokens)[1])
            rows.append({"model": name, "context": context, "ms_per_token": statistics.median(times[1:]) * 1e3,
                         "new_tokens": new_tokens, "hidden_size": hidden_size, "layers": layers, "heads": heads})
            bar.update(1)
    bar.close()
    return rows


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_kernel_table(rows: list[dict]) -> str:
    """Markdown table; for our rows, speedups (other ms / our ms, >1 = ours faster) versus transformers' fallback of
    the same op and versus SDPA causal attention at the same T."""
    by_key = {(r["op"], r["impl"], r["T"]): r for r in rows}
    header = ("| op | impl | T | fwd ms | fwd+bwd ms | × vs HF fallback fwd | × vs HF fallback fwd+bwd "
              "| × vs SDPA fwd | × vs SDPA fwd+bwd |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['T']} | skipped: {r['skipped']} | | | | | |")
            continue
        speed = ["-"] * 4
        if r["impl"].startswith(OURS):
            for i, other in enumerate([by_key.get((r["op"], HF_FALLBACK, r["T"])),
                                       by_key.get(("causal_attention", SDPA, r["T"]))]):
                if other and "skipped" not in other:
                    # 3 significant digits: a ratio far below 1 (tiny T, a loaded machine) must not print as 0.00
                    speed[2 * i] = f"{other['fwd_ms'] / r['fwd_ms']:.3g}"
                    speed[2 * i + 1] = f"{other['fwdbwd_ms'] / r['fwdbwd_ms']:.3g}"
        lines.append(f"| {r['op']} | {r['impl']} | {r['T']} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwdbwd_ms'])} | "
                     + " | ".join(speed) + " |")
    return "\n".join(lines)


def format_decode_table(rows: list[dict]) -> str:
    """Markdown table of ms/token, with the Llama/GDN ratio per context (>1 = Gated DeltaNet faster)."""
    by_key = {(r["model"], r["context"]): r for r in rows}
    lines = ["| model | context | ms/token | × vs llama_sdpa |", "|---|---|---|---|"]
    for r in rows:
        ref = by_key.get(("llama_sdpa", r["context"]))
        ratio = f"{ref['ms_per_token'] / r['ms_per_token']:.2f}" if ref else "-"
        lines.append(f"| {r['model']} | {r['context']} | {r['ms_per_token']:.2f} | {ratio} |")
    return "\n".join(lines)
