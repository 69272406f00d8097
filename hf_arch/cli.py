"""The ``hf-arch`` command: convert, train, eval, bench, card, push, variants."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_variants(args) -> int:
    from .registry import VARIANTS

    rows = [(v.name, v.model_type, v.summary) for v in VARIANTS.values()]
    if args.json:
        print(json.dumps([{"name": n, "model_type": t, "summary": s} for n, t, s in rows], indent=2))
        return 0
    width = max(len(n) for n, _, _ in rows)
    type_width = max(len(t) for _, t, _ in rows)
    for name, model_type, summary in rows:
        print(f"{name:<{width}}  {model_type:<{type_width}}  {summary}")
    return 0


def _cmd_export(args) -> int:
    if not args.native:
        raise ValueError("hf-arch export: say which format; --native (a built-in transformers architecture) is the one "
                         "there is")
    from hf_arch.conversion.native_export import export_native

    record = export_native(args.model, args.out, overwrite=args.overwrite, check=not args.no_check)
    print(_native_summary(args.out, record))
    return 0


def _native_summary(out, record: dict) -> str:
    """One line on a native export: what it was written as, its logit difference and what generation showed."""
    diff = record.get("max_abs_logit_diff", record["in_memory_max_abs_logit_diff"])
    generation = {True: "; greedy generation identical", False: "; greedy generation DIFFERENT",
                  None: "; plain transformers could not run cached generation on it: "
                        + str(record.get("generation_error_in_transformers", ""))}.get(record.get("generation_agrees", "unchecked"), "")
    return f"wrote {out} as {record['model_type']} (max |Δlogit| {diff:.2e} against the hf-arch model{generation})"


def _cmd_gates(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_arch.conversion import load_gates, save_gates
    from hf_arch.conversion.checkpoint_io import atomic_output_dir

    if args.action == "export":
        if args.base is None:
            raise SystemExit("hf-arch gates export: pass --base SRC (the checkpoint the gates were trained on)")
        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
        save_gates(model, args.out, base_model=args.base, overwrite=args.overwrite)
    else:
        from transformers import AutoTokenizer

        from hf_arch.conversion.sparsify import gates_record

        base = args.base or gates_record(args.src)["base_model"]  # the tokenizer comes from the base too
        model = load_gates(args.src, base_model=args.base)
        with atomic_output_dir(Path(args.out), overwrite=args.overwrite) as tmp:
            model.save_pretrained(tmp)
            try:
                AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
            except (OSError, ValueError, TypeError) as error:
                logging.getLogger(__name__).warning("No tokenizer saved: could not load one from %s (%s)", base, error)
    print(args.out)
    return 0


def _cmd_convert(args) -> int:
    from hf_arch.conversion import convert

    from hf_arch.conversion.api import CONVERSIONS

    if args.to not in CONVERSIONS:
        raise ValueError(f"Unknown conversion target {args.to!r}; available: {', '.join(sorted(CONVERSIONS))}")
    # The conversion flags the user gave (the others are absent: argparse.SUPPRESS), each named as its option field.
    fields = set(CONVERSIONS[args.to].options_class.__dataclass_fields__)
    given = {name: value for name, value in vars(args).items() if name in _CONVERSION_FLAGS}
    foreign = sorted(set(given) - fields)
    if foreign:
        flags = ", ".join(_CONVERSION_FLAGS[name] for name in foreign)
        raise ValueError(f"{flags} does not apply to --to {args.to} (its options: {', '.join(sorted(fields))})")
    options = {name: value for name, value in given.items() if name in fields}
    if args.native:
        return _convert_native(args, options)
    result = convert(
        args.src,
        args.out,
        to=args.to,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        remote_code=not args.no_remote_code,
        trust_remote_code=args.trust_remote_code,
        calibration_file=args.calibration_file,
        **options,
    )
    if args.json:
        print(json.dumps(result.record, indent=2))
    else:
        print(f"wrote {result.output_dir}")
        if result.max_abs_logit_diff is not None:
            print(f"max |Δlogit| vs source (fp32): {result.max_abs_logit_diff:.3g}")
    return 0


def _convert_native(args, options: dict) -> int:
    """``convert --native``: the conversion into a temporary directory, then its native export into OUT."""
    import shutil
    import tempfile
    from pathlib import Path

    from hf_arch.conversion import convert
    from hf_arch.conversion.native_export import export_native

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"Output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.hf-arch-", dir=out.parent))
    try:
        converted = convert(args.src, staging / "model", to=args.to, dtype=args.dtype, verify=not args.no_verify,
                            remote_code=False, trust_remote_code=args.trust_remote_code,
                            calibration_file=args.calibration_file, **options)
        record = export_native(converted.output_dir, out, overwrite=args.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(_native_summary(out, record))
    return 0


def _parse_overrides(values: list[str]) -> list[str]:
    for value in values:
        if "=" not in value:
            raise SystemExit(f"hf-arch train: override {value!r} is not of the form key=value")
    return values


def _cmd_train(args) -> int:
    from hf_arch.recipes.runner import run_recipe

    summary = run_recipe(args.recipe, _parse_overrides(args.overrides), resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_eval(args) -> int:
    from hf_arch.recipes import evaluation

    if args.lm_eval:
        results = evaluation.run_lm_eval(
            args.model, args.lm_eval.split(","), include_path=args.include_path, limit=args.limit
        )
        print(json.dumps(results, indent=2, default=str))
        return 0
    if not args.ppl_file and not args.tasks and not args.recall:
        raise SystemExit("hf-arch eval: give --ppl-file, --tasks and/or --recall (or --lm-eval TASKS)")
    for task in args.tasks or ():  # names and paths checked before the model loads
        evaluation.resolve_task(task)
    recall_settings = None
    if args.recall:
        from hf_arch.recipes.recall_probe import RecallSettings

        recall_settings = RecallSettings(lengths=tuple(args.recall_lengths), samples=args.recall_samples,
                                         batch_size=args.batch_size, pairs=args.recall_pairs)
    model, tokenizer = evaluation.load_model_and_tokenizer(args.model, dtype=args.dtype)
    results = {}
    if args.ppl_file or args.tasks:
        results = evaluation.evaluate(
            model,
            tokenizer,
            ppl_file=args.ppl_file,
            tasks=args.tasks or (),
            limit=args.limit,
            ppl_max_tokens=args.ppl_max_tokens,
            context_length=args.context_length,
            stride=args.stride,
            batch_size=args.batch_size,
        )
    tables = [evaluation.format_table(results)] if results else []
    if recall_settings is not None:
        from hf_arch.recipes.recall_probe import format_recall_table, recall_probe

        results["recall"] = recall_probe(model, tokenizer, recall_settings)
        tables.append(format_recall_table(results["recall"]))
    if args.diagnostics:
        results["diagnostics"] = _diagnostics(model, tokenizer, args)
    if args.output:
        _write_json(Path(args.output), results)
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(tables))
    return 0


def _diagnostics(model, tokenizer, args) -> dict:
    """Attention-sink share and gate statistics on the first ``--diagnostics-tokens`` tokens of the ppl file."""
    from .diagnostics import attention_diagnostics, plot_gate_histogram

    if not args.ppl_file:
        raise ValueError("--diagnostics reads its tokens from --ppl-file; give one")
    text = Path(args.ppl_file).read_text(encoding="utf-8")[: args.diagnostics_tokens * 16]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.diagnostics_tokens]
    diagnostics = attention_diagnostics(model, ids)
    if args.plot and "gate_histogram" in diagnostics:
        plot_gate_histogram(diagnostics, args.plot)
    return diagnostics


def _print_bench(args, device: str, results: dict, tables: list[str]) -> None:
    """``--json``: one object with the device, torch version and ``results``; otherwise the non-empty tables."""
    import torch

    if args.json:
        print(json.dumps({"device": device, "torch": torch.__version__, **results}, indent=2))
        return
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n\n".join(table for table in tables if table))


def _cmd_bench_kernels(args) -> int:
    import torch

    from hf_arch.recipes.kernel_benchmark import (
        DEFAULT_SEQ_LENS, benchmark_decode, benchmark_kernels, format_decode_table, format_kernel_table,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    kernels = benchmark_kernels(seq_lens=tuple(args.seq_lens or DEFAULT_SEQ_LENS), device=device,
                                repeats=3 if args.repeats is None else args.repeats, time_budget_s=args.time_budget,
                                ops=tuple(args.ops) if args.ops else None, windows=tuple(args.windows))
    decode = [] if args.skip_decode else benchmark_decode(
        contexts=tuple(args.decode_contexts), hidden_size=args.decode_hidden_size, layers=args.decode_layers,
        new_tokens=16 if args.decode_tokens is None else args.decode_tokens,
        repeats=3 if args.repeats is None else args.repeats)
    _print_bench(args, device, {"torch_threads": torch.get_num_threads(), "kernels": kernels, "decode": decode},
                 [format_kernel_table(kernels), format_decode_table(decode) if decode else ""])
    return 0


def _cmd_bench_moe(args) -> int:
    import torch

    from hf_arch.recipes.moe_benchmark import (
        DEFAULT_EXPERTS, benchmark_moe_layers, benchmark_moe_training, format_moe_layer_table,
        format_moe_training_table,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    repeats = 5 if args.repeats is None else args.repeats
    sizes = dict(hidden=args.hidden, top_k=args.top_k, expert_intermediate=args.expert_intermediate)
    layers = benchmark_moe_layers(experts=tuple(args.experts or DEFAULT_EXPERTS), tokens=args.tokens, device=device,
                                  repeats=repeats, **sizes)
    training = [] if args.skip_model else benchmark_moe_training(
        **sizes, layers=args.train_layers, experts=args.train_experts, seq_len=args.train_seq_len,
        batch_size=args.train_batch_size, steps=args.train_steps,
        vocab_size=args.train_vocab_size, device=device)
    _print_bench(args, device, {"threads": torch.get_num_threads(), "layers": layers, "training": training},
                 [format_moe_layer_table(layers), format_moe_training_table(training) if training else ""])
    return 0


def _cmd_bench_hub_kernels(args) -> int:
    import torch

    from hf_arch.recipes.hub_kernel_benchmark import benchmark_hub_kernels, format_hub_kernel_table

    results = benchmark_hub_kernels(seq_lens=tuple(args.seq_lens or (512, 2048, 8192)),
                                    decode_contexts=tuple(args.decode_contexts),
                                    decode_tokens=16 if args.decode_tokens is None else args.decode_tokens,
                                    repeats=3 if args.repeats is None else args.repeats)
    _print_bench(args, "cpu", {"torch_threads": torch.get_num_threads(), **results},
                 [format_hub_kernel_table(results)])
    return 0


def _cmd_bench(args) -> int:
    if args.model == "hub-kernels":
        return _cmd_bench_hub_kernels(args)
    if args.model == "kernels":
        return _cmd_bench_kernels(args)
    if args.model == "moe":
        return _cmd_bench_moe(args)
    from hf_arch.recipes.benchmark import benchmark_model, format_benchmark

    results = benchmark_model(
        args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        decode_tokens=32 if args.decode_tokens is None else args.decode_tokens,
        implementations=args.attn_implementations.split(","),
        repeats=3 if args.repeats is None else args.repeats,
    )
    print(json.dumps(results, indent=2) if args.json else format_benchmark(results))
    return 0


def _cmd_card(args) -> int:
    from hf_arch.model_cards.card import write_model_card

    path = write_model_card(args.model_dir, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _cmd_push(args) -> int:
    from hf_arch.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, token=args.token, private=args.private)
    print(url)
    return 0


def _write_json(path: Path, data) -> None:
    from .atomic_io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# Conversion option field -> its CLI flag (filled by build_parser).
_CONVERSION_FLAGS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    from .configuration import LINEAR_ATTN_FEATURE_MAPS

    parser = argparse.ArgumentParser(prog="hf-arch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gates", help="sparse-attention gates as adapters: export them from a trained model, or "
                                     "apply them onto their base")
    p.add_argument("action", choices=["export", "apply"],
                   help="export MODEL OUT --base SRC: write only the gates / routers; apply GATES OUT [--base SRC]: "
                        "write the full model rebuilt from the base plus the gates")
    p.add_argument("src", help="export: a trained hfa_sparse_attention model dir; apply: a gates dir")
    p.add_argument("out")
    p.add_argument("--base", default=None, help="the base checkpoint (export: required; apply: default the recorded one)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_gates)

    p = sub.add_parser("export", help="write a model as a built-in transformers architecture (--native: MoE models "
                                      "as qwen3_moe / mixtral / qwen2_moe, all-Gated-DeltaNet as qwen3_next, KDA "
                                      "with NoPE MLA as kimi_linear), "
                                      "checked against ours in a process without hf-arch")
    p.add_argument("model", help="an hf-arch model directory")
    p.add_argument("out")
    p.add_argument("--native", action="store_true", help="a built-in transformers model type (refused, with the "
                                                         "reason, where the model is not exactly one)")
    p.add_argument("--no-check", action="store_true", help="skip reloading the export with plain transformers")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("variants", help="list the registered architecture variants")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_variants)

    p = sub.add_parser("convert", help="convert a Llama-family checkpoint into a variant")
    p.add_argument("src", help="local checkpoint dir or Hub id (Llama, Mistral, Qwen2, Qwen3, SmolLM)")
    p.add_argument("out", help="output dir (refused if it exists, unless --overwrite)")
    p.add_argument("--to", default="gated_attention", help="target variant (see `hf-arch variants`)")
    # Conversion options: each flag is the option field of the same name of the --to targets that have it (absent
    # unless given, so the target's own defaults apply; a flag its target does not take is refused by name).
    conv = p.add_argument_group("conversion options", argument_default=argparse.SUPPRESS)
    conv.add_argument("--granularity", choices=["headwise", "elementwise"])
    conv.add_argument("--gate-bias", action="store_true", help="give the gate projection a bias")
    conv.add_argument("--gate-rank", type=int, help="low-rank gate projection")
    conv.add_argument("--gate-init", choices=["identity", "normal"],
                      help="identity: gate exactly 1 (2·σ(0)), logits unchanged; normal: random from-scratch init")
    conv.add_argument("--gate-lr-scale", type=float, help="LR multiplier recipes apply to the gates")
    conv.add_argument("--method",
                      help="--to gla: liger | lolcats | lizard | still; --to gated_deltanet: mamba_init; --to moe: partition | "
                           "upcycle | read_me (Read-ME: a partition routed by one pre-gate on the embeddings, "
                           "distilled on --calibration-file); --to sparse_attention: seer | flux | delta (training-free)")
    conv.add_argument("--keep-full-attention", type=int, nargs="+", metavar="LAYER",
                      help="linearization: layers that keep softmax attention")
    conv.add_argument("--ratio", type=int, help="linearization: R linear layers per full-attention layer")
    conv.add_argument("--window", type=int, help="linearization: sliding-window size of hybrid layers (default 128)")
    conv.add_argument("--num-sinks", type=int, help="linearization (lizard): learnable sink logits")
    conv.add_argument("--selection-block", type=int,
                      help="linearization (still): positions per selection block (<= --window; default 64)")
    conv.add_argument("--selection-topk", type=int,
                      help="linearization (still): tokens of each block kept as softmax keys beyond the window (default 8)")
    conv.add_argument("--feature-map", choices=list(LINEAR_ATTN_FEATURE_MAPS),
                      help="linearization: the linear branch's feature map (default: the method's; norm_aware: NaLaFormer; "
                           "np_map: STILL's norm-preserved map)")
    conv.add_argument("--mix-weights", type=float, nargs=2, metavar=("W_LINEAR", "W_WINDOW"),
                      help="linearization hybrids: initial weights of the linear and window branches "
                           "(lizard: W_LINEAR 1, W_WINDOW is the learnable α's init; lolcats: W_WINDOW is γ's init in (0, 1))")
    conv.add_argument("--experts", type=int, help="moe: FFN experts per layer")
    conv.add_argument("--top-k", type=int, help="moe: experts per token")
    conv.add_argument("--split", choices=["random", "cluster", "activation"],
                      help="moe partition: how FFN neurons are grouped into experts (default activation: needs "
                           "--calibration-file)")
    conv.add_argument("--shared-neurons", "--shared-expert", type=int, metavar="N",
                      help="moe partition: the N most active neurons form an always-on shared expert (default: about "
                           "one expert's width; 0: none)")
    conv.add_argument("--router", choices=["tempered_topk", "softmax_topk"],
                      help="moe: router class (default: tempered_topk for partition, exact with every expert active)")
    conv.add_argument("--router-distill-steps", type=int,
                      help="moe partition: fit each router to the experts that carry the dense output on the "
                           "calibration text (default 200; 0: keep the centroid rows)")
    conv.add_argument("--learners", type=int,
                      help="acm: learners per FFN (default 4; an uneven width makes the first ones a neuron wider)")
    conv.add_argument("--learner-steps", type=int,
                      help="acm: steps distilling each layer's learners so every prefix approximates the FFN "
                           "(default 200)")
    conv.add_argument("--gate-steps", type=int,
                      help="acm: steps fitting each layer's gate to the fewest learners within --tolerance "
                           "(default 300)")
    conv.add_argument("--tolerance", type=float,
                      help="acm: relative squared error of a prefix that counts as close enough (default 0.1)")
    conv.add_argument("--compute-loss-weight", type=float,
                      help="acm: β of the converted model's compute price (its loss adds β × the expected share of "
                           "learners run, in training; default 0: none)")
    conv.add_argument("--pre-gate-hidden", type=int, help="moe read_me: the pre-gate MLP's width (default 256)")
    conv.add_argument("--pre-gate-steps", type=int,
                      help="moe read_me: steps fitting the pre-gate to every layer's calibration targets "
                           "(default 300)")
    conv.add_argument("--zero-experts", type=int, help="moe: MoE++ zero experts")
    conv.add_argument("--copy-experts", type=int, help="moe: MoE++ copy experts")
    conv.add_argument("--routed-scale", type=float,
                      help="moe: multiplier of the renormalised top-k weights (default: top-k for partition, i.e. the "
                           "chosen experts' plain sum; LLaMA-MoE uses experts/top-k)")
    conv.add_argument("--pool", action="store_true",
                      help="moe: UniPool, every layer's experts in one global pool all routers can reach")
    conv.add_argument("--pool-foreign-bias", type=float,
                      help="moe --pool: router bias against other layers' experts (default: large enough that routing "
                           "starts exactly as without the pool)")
    conv.add_argument("--affine-init", "--insert-init", dest="init", choices=["identity", "normal"],
                      help="affine_attention / move: identity (logits equal the source) or normal")
    conv.add_argument("--slots", type=int, help="move: value embeddings in the shared bank")
    conv.add_argument("--grow", type=int,
                      help="tokenformer: key / value parameter tokens added to every attention projection (and, "
                           "unless --grow-ffn says otherwise, to every feed-forward Pattention); the function is "
                           "unchanged")
    conv.add_argument("--grow-ffn", type=int, help="tokenformer: parameter tokens added to each feed-forward Pattention")
    conv.add_argument("--grow-signal-heads", type=int,
                      help="diff_attention (from a trained hfa_diff_attention model): copies per signal head (exact)")
    conv.add_argument("--block-size", type=int, help="sparse_attention: tokens per block")
    conv.add_argument("--gate-dim", type=int, help="sparse_attention seer: gate width (default head_dim)")
    conv.add_argument("--selection", choices=["threshold", "topk", "budget"],
                      help="sparse_attention seer: how gate probabilities pick blocks at inference")
    conv.add_argument("--threshold", type=float, help="sparse_attention seer: keep blocks with p > this")
    conv.add_argument("--topk", type=int, help="sparse_attention seer: key blocks per query block (topk)")
    conv.add_argument("--token-budget", type=int,
                      help="sparse_attention seer: tokens per query block (budget); delta: salient keys per query "
                           "(default 512)")
    conv.add_argument("--dense-layers", type=int,
                      help="sparse_attention delta: the first layers keep full attention (default 2)")
    conv.add_argument("--selection-layers", type=int, nargs="+", metavar="LAYER",
                      help="sparse_attention delta: layers that select the keys the next layers attend (default: the "
                           "first after the dense ones and the middle one)")
    conv.add_argument("--sink-tokens", type=int, help="sparse_attention delta: first keys always kept (default 4)")
    conv.add_argument("--window-tokens", type=int,
                      help="sparse_attention delta: each query's most recent keys, always kept (default 64)")
    conv.add_argument("--router-hidden", type=int, help="sparse_attention flux: router MLP width")
    conv.add_argument("--router-bias", type=float,
                      help="sparse_attention flux: initial logit advantage of full attention")
    conv.add_argument("--sink-blocks", type=int, help="sparse_attention flux: sink blocks of the sparse branch")
    conv.add_argument("--window-blocks", type=int,
                      help="sparse_attention flux: local blocks of the sparse branch")
    conv.add_argument("--target-sparsity", type=float,
                      help="sparse_attention flux: share of layer choices that should go sparse")
    conv.add_argument("--calibration-tokens", type=int)
    conv.add_argument("--seed", type=int)
    _CONVERSION_FLAGS.update({action.dest: action.option_strings[0] for action in conv._group_actions})
    p.add_argument("--calibration-file", default=None,
                   help="text for activation statistics (moe --split activation / --shared-neurons)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the logit comparison against the source")
    p.add_argument("--no-remote-code", action="store_true", help="do not write trust_remote_code files + auto_map")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the SOURCE to run its own code")
    p.add_argument("--native", action="store_true",
                   help="write OUT as the built-in transformers architecture the conversion equals (MoE: qwen3_moe / "
                        "mixtral / qwen2_moe; all-GDN: qwen3_next; KDA: kimi_linear; see `export`), or refuse")
    p.add_argument("--json", action="store_true", help="print the conversion record as JSON")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="run a YAML recipe with Trainer")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=10")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing final model in output_dir")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity, zero-shot multiple choice and recall probes")
    p.add_argument("model")
    p.add_argument("--ppl-file", help="text file for sliding-window perplexity")
    p.add_argument("--ppl-max-tokens", type=int, default=None)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--tasks", nargs="*",
                   help="multiple-choice tasks: piqa, arc_easy, winogrande (the shared assets' files, found via "
                        "$HF_ARCH_ASSETS, default ../shared/assets) or jsonl paths (PIQA / ARC-Easy / WinoGrande formats)")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (needs [eval])")
    p.add_argument("--include-path", help="lm-eval --include_path for local task YAMLs")
    p.add_argument("--recall", action="store_true",
                   help="recall probes generated from the model's vocabulary: multi-query associative recall (MQAR) "
                        "and passkey retrieval, accuracy ± stderr per length")
    p.add_argument("--recall-lengths", type=int, nargs="+", default=[256, 512, 1024],
                   help="--recall: tokens per sequence / prompt")
    p.add_argument("--recall-samples", type=int, default=16, help="--recall: sequences and prompts per length")
    p.add_argument("--recall-pairs", type=int, default=None,
                   help="--recall: MQAR key-value pairs per sequence (default: length // 4, the hardest)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also report attention-sink share and gate-score statistics (Gated Attention paper)")
    p.add_argument("--diagnostics-tokens", type=int, default=256)
    p.add_argument("--plot", help="with --diagnostics: save the gate-score histogram to this PNG")
    p.add_argument("--output", help="also write the results JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="time forward, forward+backward and decode of a model "
                                     "(`bench kernels`: the sequence-mixing kernels and cached decode; "
                                     "`bench moe`: MoE layers and MoE LM training; `bench recovery SRC --out DIR`: "
                                     "convert, recover and evaluate, see `hf-arch bench recovery --help`; `bench sparse "
                                     "SRC --out DIR`: learned sparse attention, see `hf-arch bench sparse --help`; "
                                     "`bench scratch --out DIR`: every variant vs a Llama of equal parameter count, "
                                     "trained from scratch, see `hf-arch bench scratch --help`; `bench e2e SRC`: "
                                     "prefill, decode and memory of conversions vs the source, see "
                                     "`hf-arch bench e2e --help`; `bench hub-kernels`: transformers' own Qwen3-Next "
                                     "with and without hf_arch.use_kernels(), training step and decode; `bench sequence-parallel`: "
                                     "LASP-2 training steps, 1 process vs N, tokens/s and memory per rank; `bench "
                                     "modes MODEL`: MoDES expert skipping, skip rate vs perplexity, see "
                                     "`hf-arch bench modes --help`; `bench expert-parallel`: MoE training steps, "
                                     "experts in one process vs sharded over N; `bench routers --out DIR`: every MoE "
                                     "router trained from scratch on the same tokens)")
    p.add_argument("model", help="model dir / Hub id, `kernels` for the kernel + decode benchmark, "
                                 "`moe` for the MoE layer + training benchmark, or `recovery`")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="new tokens to decode (default 32; `bench kernels`: 16 per context)")
    p.add_argument("--attn-implementations", default="eager,sdpa")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; `bench moe`: 5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="bench kernels: sequence lengths")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="bench kernels / moe: default cuda if available")
    p.add_argument("--skip-decode", action="store_true", help="bench kernels: skip the decode-latency benchmark")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[512, 2048, 8192],
                   help="bench kernels: prefilled context lengths for decode")
    p.add_argument("--decode-hidden-size", type=int, default=256, help="bench kernels: decode models' width")
    p.add_argument("--decode-layers", type=int, default=4, help="bench kernels: decode models' depth")
    p.add_argument("--time-budget", type=float, default=None,
                   help="bench kernels: skip what is left of the kernel table after this many seconds")
    p.add_argument("--ops", nargs="+", default=None, help="bench kernels: only these ops (e.g. gated_delta_rule kda)")
    p.add_argument("--windows", type=int, nargs="+", default=[64],
                   help="bench kernels: sliding windows of the sliding_window_attention and liger_hybrid rows")
    p.add_argument("--experts", type=int, nargs="+", default=None,
                   help="bench moe: numbers of experts for the layer table (default 8 16 64)")
    p.add_argument("--tokens", type=int, default=4096, help="bench moe: tokens per layer call")
    p.add_argument("--hidden", type=int, default=256, help="bench moe: hidden size (layers and training models)")
    p.add_argument("--top-k", type=int, default=2, help="bench moe: experts per token")
    p.add_argument("--expert-intermediate", type=int, default=None,
                   help="bench moe: expert width I (default 4·hidden/top_k; the dense FFN is top_k·I wide)")
    p.add_argument("--skip-model", action="store_true", help="bench moe: skip the LM training benchmark")
    p.add_argument("--train-layers", type=int, default=4, help="bench moe: training models' depth")
    p.add_argument("--train-experts", type=int, default=8, help="bench moe: experts per layer of the MoE LMs")
    p.add_argument("--train-seq-len", type=int, default=256, help="bench moe: training sequence length")
    p.add_argument("--train-batch-size", type=int, default=4, help="bench moe: training batch size")
    p.add_argument("--train-steps", type=int, default=5, help="bench moe: timed training steps (after 2 warm-up)")
    p.add_argument("--train-vocab-size", type=int, default=4096, help="bench moe: training models' vocabulary")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("card", help="write README.md (model card) into a model dir")
    p.add_argument("model_dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("push", help="upload a model dir (weights, config, tokenizer, card) to the Hub")
    p.add_argument("model_dir")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "recovery"]:  # its own options: convert + recover + evaluate (see the module)
        from hf_arch.recipes.recovery_benchmark import main as recovery_main

        return recovery_main(argv[2:])
    if argv[:2] == ["bench", "sparse"]:  # its own options: convert + train gates/routers + sweep + time
        from hf_arch.recipes.sparse_benchmark import main as sparse_main

        return sparse_main(argv[2:])
    if argv[:2] == ["bench", "scratch"]:  # its own options: train every variant + a Llama baseline from scratch
        from hf_arch.recipes.scratch_comparison import main as scratch_main

        return scratch_main(argv[2:])
    if argv[:2] == ["bench", "e2e"]:  # its own options: prefill / decode / memory of conversions vs the source
        from hf_arch.recipes.e2e_benchmark import main as e2e_main

        return e2e_main(argv[2:])
    if argv[:2] == ["bench", "routers"]:  # its own options: every MoE router trained from scratch side by side
        from hf_arch.recipes.router_comparison import main as routers_main

        return routers_main(argv[2:])
    if argv[:2] == ["bench", "expert-parallel"]:  # its own options: MoE steps, all experts in one process vs sharded
        from hf_arch.recipes.expert_parallel_benchmark import main as expert_parallel_main

        return expert_parallel_main(argv[2:])
    if argv[:2] == ["bench", "modes"]:  # its own options: MoDES expert skipping, skip rate vs perplexity
        from hf_arch.recipes.modes_benchmark import main as modes_main

        return modes_main(argv[2:])
    if argv[:2] == ["bench", "sequence-parallel"]:  # its own options: LASP-2 steps, 1 process vs N
        from hf_arch.recipes.sequence_parallel_benchmark import main as sequence_parallel_main

        return sequence_parallel_main(argv[2:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import hf_arch  # noqa: F401  (registers the variants)

    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError, RuntimeError, ImportError) as error:
        if args.verbose:
            raise
        print(f"hf-arch {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
