"""Learned sparse attention on a frozen checkpoint: perplexity vs attention density, and attention time sparse/dense.

    hf-arch bench sparse SRC --out outputs/sparse [--context 2048 --gate-steps 60 --flux-steps 30 | --minutes M]
        [--methods seer flux delta] [--json]

1. **SeerAttention**: convert (``--to sparse_attention --method seer``), train the block gates by self-distillation
   (the shipped recipe's settings, ``--gate-steps`` steps of ``--context`` tokens of WikiText-2 validation), then
   score WikiText-2 test perplexity over ``--eval-windows`` non-overlapping windows of ``--context`` tokens for each
   selection setting (thresholds, top-k), recording the share of causal blocks actually computed (density).
2. **Flux**: convert with each ``--flux-targets`` sparsity target, train the routers (self-distillation + the
   Lagrangian), and score perplexity with the share of layers that went sparse; plus the all-sparse branch
   (every layer sink + window) as the floor.
3. **DELTA** (training-free): convert with each ``--delta-budgets`` token budget (``--to sparse_attention --method
   delta``, ``--delta-dense-layers`` full layers, default selection layers) and score perplexity with the share of
   causal (query, key) pairs attended, over the selection + sparse layers and over every layer.
4. **Attention time**: the attention op alone at ``--context`` with the source's head shapes, dense causal SDPA vs
   ``block_sparse_attention`` at the measured Seer masks' densities (torch path on CPU, Triton on CUDA).

``--minutes M`` trains the gates and each Flux target for M minutes of this process's CPU time (``--budget-clock``)
instead of fixed steps, as `bench recovery` budgets its stages. A rerun continues ``sparse.json`` when its settings
match (the trained gates are reused and only new ``--thresholds`` / ``--topk`` settings scored; finished Flux targets
are kept); ``--overwrite`` starts afresh. Writes ``sparse.json`` and ``sparse.png`` (perplexity vs density) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..atomic_io import atomic_write_text
from .recovery_benchmark import _assets, _run_stage, refuse_other_settings, split_text_file


def eval_windows(tokenizer, eval_file: Path, context: int, windows: int) -> torch.Tensor:
    text = Path(eval_file).read_text(encoding="utf-8")[: context * windows * 8]
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() < context * windows:
        raise SystemExit(f"--eval-file {eval_file} holds {ids.numel()} tokens, fewer than {windows} windows of "
                         f"{context}")
    return ids[: context * windows].view(windows, context)


@torch.no_grad()
def score(model, windows: torch.Tensor) -> dict:
    """Mean next-token NLL over the windows (each its own prefill), with the attention density the model reports."""
    from ..layers.delta_attention import delta_attended_share
    from ..layers.sparse_attention import attention_density, flux_sparse_share

    nll, densities, shares, attended = [], [], [], []
    for row in windows:
        out = model(input_ids=row[None], labels=row[None], use_cache=False)
        nll.append(out.loss.item())
        density, share, pairs = attention_density(out), flux_sparse_share(out), delta_attended_share(out)
        if density is not None:
            densities.append(density)
        if share is not None:
            shares.append(share)
        if pairs is not None:
            attended.append(pairs)
    mean = sum(nll) / len(nll)
    result = {"ppl": round(math.exp(mean), 3), "nll": round(mean, 5)}
    if densities:
        result["density"] = round(sum(densities) / len(densities), 4)
    if shares:
        result["sparse_share"] = round(sum(shares) / len(shares), 4)
    if attended:
        result["attended_share"] = round(sum(attended) / len(attended), 4)
    return result


def _train(converted: Path, out: Path, sections: dict, train_file: Path, args) -> dict:
    """Trains for the fixed steps in ``sections`` or, with ``--minutes``, for the steps a pilot says fit the budget
    (as `bench recovery` does); the summary carries the wall and CPU seconds of training alone."""
    recipe = {"model": str(converted), "output_dir": str(out),
              "data": {"train_file": str(train_file), "block_size": args.context, "add_bos": False}, **sections}
    return _run_stage(recipe, out.parent, out.name, args)


def _base_training(steps: int) -> dict:
    return {"mode": "new_params", "max_steps": steps, "learning_rate": 1e-3, "per_device_train_batch_size": 1,
            "logging_steps": 10, "save_steps": 10**6, "save_total_limit": 1, "lr_scheduler_type": "cosine",
            "warmup_steps": 5}


def _seer_settings(args) -> list[tuple[str, float]]:
    """``(selection, value)``: the config field ``sparse_attn_<selection>`` takes the value."""
    return [("threshold", t) for t in args.thresholds] + [("topk", k) for k in args.topk]


def run_seer(args, assets: Path, windows: torch.Tensor, train_file: Path, earlier: dict | None = None) -> dict:
    """Gates converted and trained, then every selection setting scored; with ``earlier`` (a finished run's record
    whose checkpoint is still there) the trained gates are reused and only the settings it lacks are scored."""
    from transformers import AutoModelForCausalLM

    from ..conversion import convert

    work = Path(args.out) / "seer"
    if earlier is not None and Path(earlier["checkpoint"]).is_dir():
        record = dict(earlier)
    else:
        shutil.rmtree(work, ignore_errors=True)
        converted = work / "converted"
        convert(args.source, converted, to="sparse_attention", method="seer", block_size=args.block_size)
        summary = _train(converted, work / "gates", {"training": {**_base_training(args.gate_steps),
                                                                  "objective": "gate_distillation",
                                                                  "learning_rate": args.gate_lr}},
                         train_file, args)
        record = {**_training_record(summary, args), "gate_loss_start": summary["loss_start"],
                  "gate_loss_end": summary["loss_end"], "points": [], "checkpoint": str(work / "gates" / "final")}
    points = list(record["points"])
    done = {(p["selection"], p[p["selection"]]) for p in points}
    todo = [setting for setting in _seer_settings(args) if setting not in done]
    if todo:
        model = AutoModelForCausalLM.from_pretrained(record["checkpoint"], dtype=torch.float32).eval()
        for selection, value in todo:
            model.config.sparse_attn_selection = selection
            setattr(model.config, f"sparse_attn_{selection}", value)
            points.append({"selection": selection, selection: value, **score(model, windows)})
            print(f"seer {points[-1]}", flush=True)
    return {**record, "points": points}


def run_delta(args, windows: torch.Tensor, earlier: dict | None = None) -> dict:
    """DELTA at each token budget: converted (no training) and scored; budgets already in ``earlier`` are kept."""
    from transformers import AutoModelForCausalLM

    from ..conversion.sparsify import SparsifyOptions, sparsify

    points = list((earlier or {}).get("points", []))
    done = {p["token_budget"] for p in points}
    source = None
    for budget in args.delta_budgets:
        if budget in done:
            continue
        if source is None:
            source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
        model = sparsify(source, SparsifyOptions(method="delta", token_budget=budget,
                                                 dense_layers=args.delta_dense_layers,
                                                 selection_layers=args.delta_selection_layers,
                                                 sink_tokens=args.delta_sink_tokens,
                                                 window_tokens=args.delta_window_tokens))
        roles = [layer.self_attn.role for layer in model.model.layers]
        point = {"token_budget": budget, **score(model, windows)}
        # dense layers attend every causal pair: the share over all layers counts them as 1
        point["attended_share_all_layers"] = round(
            (roles.count("dense") + (len(roles) - roles.count("dense")) * point["attended_share"]) / len(roles), 4)
        point["selection_layers"] = [i for i, role in enumerate(roles) if role == "selection"]
        points.append(point)
        print(f"delta {point}", flush=True)
        del model
    return {"dense_layers": args.delta_dense_layers, "sink_tokens": args.delta_sink_tokens,
            "window_tokens": args.delta_window_tokens, "points": sorted(points, key=lambda p: p["token_budget"])}


def _training_record(summary: dict, args) -> dict:
    """What a trained component's row records of its training: steps, tokens, wall and CPU seconds."""
    return {"steps": summary["steps"], "tokens": summary["steps"] * args.context,
            "train_seconds": round(summary["train_seconds"]), "train_cpu_seconds": round(summary["train_cpu_seconds"]),
            **({"budget_minutes": args.minutes, "budget_clock": args.budget_clock} if args.minutes else {})}


def run_flux(args, assets: Path, windows: torch.Tensor, train_file: Path, earlier: dict | None = None,
             save=None) -> dict:
    """Each ``--flux-targets`` target converted, its routers trained and scored (targets ``earlier`` holds are kept),
    then the all-sparse floor; ``save(flux)`` after each target, so an interrupted run keeps what it finished."""
    from transformers import AutoModelForCausalLM

    from ..conversion import convert
    from ..layers.sparse_attention import sparse_attention_layers

    rows = list((earlier or {}).get("targets", []))
    done = {row["target_sparsity"] for row in rows}
    model = None
    for target in args.flux_targets:
        if target in done:
            continue
        work = Path(args.out) / f"flux_{target}"
        shutil.rmtree(work, ignore_errors=True)
        converted = work / "converted"
        convert(args.source, converted, to="sparse_attention", method="flux", block_size=args.block_size,
                sink_blocks=args.sink_blocks, window_blocks=args.window_blocks, target_sparsity=target,
                router_bias=args.flux_router_bias)
        sections = {"training": {**_base_training(args.flux_steps), "learning_rate": args.flux_lr},
                    "distill": {"teacher": "self", "kl_weight": 1.0, "lm_weight": 0.0, "temperature": 1.0}}
        summary = _train(converted, work / "router", sections, train_file, args)
        model = AutoModelForCausalLM.from_pretrained(work / "router" / "final", dtype=torch.float32).eval()
        rows.append({"target_sparsity": target, **_training_record(summary, args),
                     "loss_start": summary["loss_start"], "loss_end": summary["loss_end"], **score(model, windows)})
        print(f"flux {rows[-1]}", flush=True)
        if save is not None:
            save({**(earlier or {}), "targets": rows})
    result = {**(earlier or {}), "targets": rows}
    if "all_sparse" not in result:  # the floor: every layer on the sink + window branch
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(Path(args.out) / f"flux_{rows[-1]['target_sparsity']}"
                                                         / "router" / "final", dtype=torch.float32).eval()
        with torch.no_grad():
            for layer in sparse_attention_layers(model):
                layer.layer_router.out_bias.copy_(torch.tensor([-30.0, 30.0]))
        result["all_sparse"] = score(model, windows)
    return result


def branch_density(context: int, block: int, sink: int, window: int) -> float:
    """Share of causal blocks the sink + window branch computes."""
    N = math.ceil(context / block)
    kept = sum(1 for i in range(N) for j in range(i + 1) if j < sink or j > i - window)
    return kept / (N * (N + 1) / 2)


def time_attention(args, config, densities: list[float]) -> dict:
    """Dense causal SDPA vs the block-sparse op at each density (random masks of that density, first + diagonal
    kept), one layer's heads at ``--context``; median of ``--repeats`` runs, forward only."""
    import torch.nn.functional as F

    from ..kernels.block_sparse.benchmark import random_block_mask
    from ..kernels.ops import block_sparse_attention
    from .benchmark import sync_device

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    H, H_kv, D, T = config.num_attention_heads, config.num_key_value_heads, config.head_dim, args.context
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, D, generator=generator).to(device, dtype)
    k = torch.randn(1, T, H_kv, D, generator=generator).to(device, dtype)
    v = torch.randn(1, T, H_kv, D, generator=generator).to(device, dtype)

    def timed(fn) -> float:
        fn()
        sync_device(device)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            sync_device(device)
            runs.append(time.perf_counter() - start)
        return sorted(runs)[len(runs) // 2]

    kr, vr = (x.transpose(1, 2).repeat_interleave(H // H_kv, dim=1) for x in (k, v))
    with torch.no_grad():
        dense = timed(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, is_causal=True))
        N = math.ceil(T / args.block_size)
        rows = []
        for density in densities:
            mask = random_block_mask(N, H, density, generator).to(device)
            actual = float(mask.sum()) / (H * N * (N + 1) / 2)
            seconds = timed(lambda: block_sparse_attention(q, k, v, mask, args.block_size))
            rows.append({"density": round(actual, 4), "seconds": round(seconds, 5),
                         "dense_over_sparse": round(dense / seconds, 3)})
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "context": T, "heads": H, "kv_heads": H_kv,
            "head_dim": D, "dense_sdpa_seconds": round(dense, 5), "block_sparse": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(result["dense"]["ppl"], color="black", linestyle="--", label="dense (source)")
    seer = (result.get("seer") or {}).get("points", [])
    for selection, marker in (("threshold", "o"), ("topk", "s")):
        pts = sorted((p["density"], p["ppl"]) for p in seer if p["selection"] == selection and "density" in p)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"SeerAttention ({selection})")
    flux = result.get("flux")
    if flux:
        pts = [(1 - r["sparse_share"] * (1 - result["flux_branch_density"]), r["ppl"]) for r in flux["targets"]]
        ax.scatter(*zip(*pts), marker="^", color="tab:red", label="Flux router (targets)", zorder=3)
        ax.scatter([result["flux_branch_density"]], [flux["all_sparse"]["ppl"]], marker="x", color="tab:red",
                   label="all layers sink + window", zorder=3)
    delta = (result.get("delta") or {}).get("points", [])
    if delta:
        pts = [(p["attended_share_all_layers"], p["ppl"]) for p in delta]
        ax.plot(*zip(*pts), marker="D", color="tab:green", label="DELTA (token budgets; no training)")
        for p in delta:
            ax.annotate(str(p["token_budget"]), (p["attended_share_all_layers"], p["ppl"]), fontsize=7)
    ax.set_xlabel("attention computed (share of causal blocks; DELTA: of causal query-key pairs, every layer)")
    ax.set_ylabel(f"{Path(result.get('eval_file', 'wikitext2_test.txt')).name} perplexity @ "
                  f"{result['settings']['context']} tokens")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Llama-family checkpoint dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--gate-steps", type=int, default=60)
    parser.add_argument("--gate-lr", type=float, default=1e-3)
    parser.add_argument("--flux-steps", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes for the gates and for each Flux target (a pilot picks the steps, as in "
                             "`bench recovery`); overrides --gate-steps / --flux-steps")
    parser.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                        help="how --minutes are counted: this process's CPU time (default) or wall-clock time")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[1e-3, 5e-3, 2e-2, 5e-2])
    parser.add_argument("--topk", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--flux-targets", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--flux-router-bias", type=float, default=1.0,
                        help="initial logit advantage of full attention (any value > 0 starts exactly at the source "
                             "at inference; lower explores the sparse branch sooner in training)")
    parser.add_argument("--flux-lr", type=float, default=1e-2)
    parser.add_argument("--sink-blocks", type=int, default=1)
    parser.add_argument("--window-blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=["seer", "flux", "delta"], default=["seer", "flux", "delta"],
                        help="which methods to run (flux also needs --flux-targets)")
    parser.add_argument("--delta-budgets", type=int, nargs="*", default=[128, 256, 512],
                        help="DELTA: salient keys kept per query by the selection layers")
    parser.add_argument("--delta-dense-layers", type=int, default=2)
    parser.add_argument("--delta-selection-layers", type=int, nargs="+", default=None,
                        help="DELTA: the selection layers (default: the first after the dense ones and the middle one)")
    parser.add_argument("--delta-sink-tokens", type=int, default=4)
    parser.add_argument("--delta-window-tokens", type=int, default=64)
    parser.add_argument("--train-file", default=None, help="default: WikiText-2 validation split from the assets")
    parser.add_argument("--eval-file", default=None, help="default: WikiText-2 test split from the assets")
    parser.add_argument("--text-file", default=None,
                        help="one text to split into training text and a held-out evaluation tail (in-domain runs)")
    parser.add_argument("--document-separator", default=None, help="--text-file: the line between documents")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="--text-file: documents held out")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--retime", action="store_true",
                        help="only redo the attention timing of an existing sparse.json (e.g. on an idle machine)")
    parser.add_argument("--json", action="store_true", help="print sparse.json instead of the table")
    args = parser.parse_args(argv)
    if args.retime:
        return _retime(args)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.minutes is not None and not args.minutes > 0:
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    if args.context < 2 * args.block_size:
        raise SystemExit(f"--context {args.context} holds fewer than two blocks of --block-size {args.block_size}: "
                         "nothing could be skipped")
    assets = _assets()
    out = Path(args.out)
    result_path = out / "sparse.json"
    out.mkdir(parents=True, exist_ok=True)
    if args.text_file:
        args.train_file, args.eval_file = split_text_file(Path(args.text_file), out / "data", args.document_separator,
                                                          args.holdout_fraction)
    train_file = Path(args.train_file) if args.train_file else assets / "data" / "wikitext2_valid.txt"
    eval_file = Path(args.eval_file) if args.eval_file else assets / "data" / "wikitext2_test.txt"
    earlier = _resumable(result_path, args) if result_path.exists() and not args.overwrite else None
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    windows = eval_windows(tokenizer, eval_file, args.context, args.eval_windows)
    if earlier is not None:
        result = {**earlier, "settings": {**earlier["settings"], **_settings(args)}}
    else:
        source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
        result = {"source": args.source, "eval_file": str(eval_file), "settings": _settings(args),
                  "dense": score(source, windows),
                  "flux_branch_density": round(branch_density(args.context, args.block_size, args.sink_blocks,
                                                              args.window_blocks), 4)}
        del source

    def save() -> None:
        atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")

    if "seer" in args.methods:
        result["seer"] = run_seer(args, assets, windows, train_file, earlier=result.get("seer"))
        save()
    if "delta" in args.methods and args.delta_budgets:
        result["delta"] = run_delta(args, windows, earlier=result.get("delta"))
        save()
    if "flux" in args.methods and args.flux_targets:
        def save_flux(flux: dict) -> None:
            result["flux"] = flux
            save()

        result["flux"] = run_flux(args, assets, windows, train_file, earlier=result.get("flux"), save=save_flux)
        save()
    result["attention_time"] = time_attention(args, AutoConfig.from_pretrained(args.source), _densities(result))
    save()
    plot(result, out / "sparse.png")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if math.isfinite(result["dense"]["ppl"]) else 1


# Settings a rerun must share with the results it continues (the selection sweeps and Flux targets may grow).
RESUME_KEYS = ("source", "context", "block_size", "gate_steps", "gate_lr", "flux_steps", "flux_lr", "flux_router_bias",
               "sink_blocks", "window_blocks", "eval_windows", "train_file", "eval_file", "minutes", "budget_clock",
               "delta_dense_layers", "delta_selection_layers", "delta_sink_tokens", "delta_window_tokens")


def _settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}


def _resumable(path: Path, args) -> dict:
    """The results in ``path`` if this run may continue them (same settings), else a SystemExit naming the keys."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    refuse_other_settings(path, earlier.get("settings", {}), _settings(args), RESUME_KEYS,
                          {"delta_dense_layers": 2, "delta_selection_layers": None, "delta_sink_tokens": 4,
                           "delta_window_tokens": 64})
    return earlier


def _densities(result: dict) -> list[float]:
    return sorted({p["density"] for p in (result.get("seer") or {}).get("points", []) if "density" in p}
                  | {0.1, 0.25, 0.5})


def _retime(args) -> int:
    from transformers import AutoConfig

    path = Path(args.out) / "sparse.json"
    if not path.is_file():
        raise SystemExit(f"--retime: {path} does not exist; run the benchmark first")
    result = json.loads(path.read_text())
    result["attention_time"] = time_attention(args, AutoConfig.from_pretrained(args.source), _densities(result))
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def format_table(result: dict) -> str:
    dense = result["dense"]["ppl"]
    lines = ["| method | setting | density | ppl | ppl / dense |", "|---|---|---|---|---|",
             f"| dense | - | 1.0 | {dense} | 1.00 |"]
    for p in (result.get("seer") or {}).get("points", []):
        setting = f"threshold {p['threshold']}" if p["selection"] == "threshold" else f"top-{p['topk']} blocks"
        lines.append(f"| seer | {setting} | {p.get('density')} | {p['ppl']} | {p['ppl'] / dense:.3f} |")
    branch = result["flux_branch_density"]
    for r in (result.get("flux") or {}).get("targets", []):
        density = round(1 - r["sparse_share"] * (1 - branch), 4)
        lines.append(f"| flux | target {r['target_sparsity']} (sparse share {r['sparse_share']}) | {density} | "
                     f"{r['ppl']} | {r['ppl'] / dense:.3f} |")
    if result.get("flux"):
        floor = result["flux"]["all_sparse"]["ppl"]
        lines.append(f"| sink + window | every layer | {branch} | {floor} | {floor / dense:.3f} |")
    delta = result.get("delta") or {}
    for p in delta.get("points", []):
        lines.append(f"| delta | {p['token_budget']} keys/query ({delta['dense_layers']} dense layers, selection at "
                     f"{p['selection_layers']}; attended share of selection + sparse layers {p['attended_share']}) | "
                     f"{p['attended_share_all_layers']} | {p['ppl']} | {p['ppl'] / dense:.3f} |")
    timing = result.get("attention_time")
    if timing:
        lines += ["", f"attention op at {timing['context']} tokens on {timing['device']} ({timing['dtype']}): dense "
                  f"SDPA {timing['dense_sdpa_seconds'] * 1e3:.2f} ms", "| density | block-sparse ms | dense / sparse |",
                  "|---|---|---|"]
        lines += [f"| {r['density']} | {r['seconds'] * 1e3:.2f} | {r['dense_over_sparse']} |"
                  for r in timing["block_sparse"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
