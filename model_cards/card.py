"""Model cards (README.md) for hf-arch checkpoints, built from config.json and the optional hf-arch records."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "hf_arch_model_card.md"
RECORD_FILES = {
    "conversion": "hf_arch_conversion.json",
    "training": "hf_arch_training.json",
    "eval": "hf_arch_eval.json",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _read_json(path: Path) -> dict | None:
    """A record, or None when absent. A malformed record is skipped with a warning, never fatal for a card."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Ignoring unreadable record %s: %s", path, error)
        return None
    if not isinstance(data, dict):
        logger.warning("Ignoring record %s: expected a JSON object", path)
        return None
    return data


def load_records(model_dir: str | os.PathLike) -> dict[str, dict | None]:
    model_dir = Path(model_dir)
    return {key: _read_json(model_dir / name) for key, name in RECORD_FILES.items()}


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists() and ".." not in source


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _eval_rows(results: dict | None) -> dict[str, str]:
    """Flatten one results dict into {metric label: formatted value}."""
    rows: dict[str, str] = {}
    if not isinstance(results, dict):
        return rows
    ppl = results.get("perplexity")
    if isinstance(ppl, dict):
        where = f" ({Path(str(ppl['file'])).name})" if ppl.get("file") else ""
        rows[f"perplexity{where}"] = _fmt(ppl.get("ppl"))
    for task, metrics in sorted((results.get("tasks") or {}).items()):
        if not isinstance(metrics, dict):
            continue
        n = f", n={metrics['n']}" if metrics.get("n") is not None else ""
        for key in ("acc", "acc_norm"):
            if metrics.get(key) is not None:
                rows[f"{task} {key}{n}"] = _fmt(metrics[key])
    return rows


def _eval_table(record: dict | None) -> dict | None:
    """{"columns": [...], "rows": [[label, value, ...], ...]} with before/after columns when both exist."""
    if not record:
        return None
    if "before" in record or "after" in record:
        phases = [(name.capitalize(), _eval_rows(record.get(name))) for name in ("before", "after") if record.get(name)]
    else:
        phases = [("Value", _eval_rows(record))]
    labels = list(dict.fromkeys(label for _, rows in phases for label in rows))
    if not labels:
        return None
    return {
        "columns": ["Metric"] + [name for name, _ in phases],
        "rows": [[label] + [rows.get(label, "–") for _, rows in phases] for label in labels],
    }


def _context(model_dir: Path, repo_id: str | None) -> tuple[dict, dict]:
    """(template variables, model card metadata) for ``model_dir``."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Model directory {model_dir} does not exist (or is not a directory)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json ({config_path} is missing): not a model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error

    records = load_records(model_dir)
    conversion, training, evaluation = records["conversion"] or {}, records["training"] or {}, records["eval"]
    model_type = config.get("model_type")

    variant = None
    try:
        from hf_arch.registry import get_variant

        import hf_arch.models  # noqa: F401  (registers the variants)

        variant = get_variant(conversion.get("variant") or model_type or "")
    except KeyError:
        pass

    recipe = training.get("recipe") or {}
    train_file = ((recipe.get("data") or {}).get("train_file")) or None
    summary = training.get("summary") or {}
    training_cfg = recipe.get("training") or {}
    training_info = None
    if training:
        training_info = {
            "data": Path(str(train_file)).name if train_file else None,
            "steps": summary.get("steps", training_cfg.get("max_steps")),
            "mode": summary.get("mode", training_cfg.get("mode")),
            "loss_start": _fmt(summary.get("loss_start")) if summary.get("loss_start") is not None else None,
            "loss_end": _fmt(summary.get("loss_end")) if summary.get("loss_end") is not None else None,
        }

    source = conversion.get("source")
    license_ = conversion.get("license") or training.get("license") or recipe.get("license") or "other"
    tags = ["hf-arch", *(variant.tags if variant else ()), *([model_type] if model_type else [])]
    metadata = {
        "license": license_,
        "library_name": "transformers",
        "base_model": source if source and _is_hub_id(source) else None,
        "tags": list(dict.fromkeys(tags)),
        "datasets": [Path(str(train_file)).name] if train_file else None,
        "pipeline_tag": "text-generation",
    }

    diff = conversion.get("max_abs_logit_diff")
    variables = {
        "title": repo_id or _display_name(model_dir),
        "repo_id": repo_id or "path/to/this/model",
        "model_type": model_type,
        "architecture": (config.get("architectures") or [None])[0],
        "variant": variant,
        "conversion": conversion or None,
        "source_is_hub_id": bool(source and _is_hub_id(source)),
        "options": conversion.get("options") or {},
        "max_abs_logit_diff": _fmt(diff) if diff is not None else None,
        "new_parameter_count": len(conversion.get("new_parameters") or []),
        "training": training_info,
        "eval_table": _eval_table(evaluation),
        "auto_map": bool(config.get("auto_map")),
        "has_tokenizer": any((model_dir / name).is_file() for name in _TOKENIZER_FILES),
        "versions": conversion.get("versions") or {},
        "architecture_facts": _architecture_facts(config),
    }
    return variables, metadata


def _architecture_facts(config: dict) -> list[str]:
    """One line per notable structural choice, read from config.json (so it also works without hf_arch installed)."""
    facts = []
    layers = config.get("layer_types") or []
    if layers and len(set(layers)) > 1:
        counts = {t: layers.count(t) for t in dict.fromkeys(layers)}
        facts.append("Token mixers: " + ", ".join(f"{n} × `{t}`" for t, n in counts.items()))
    mlp = config.get("mlp_layer_types") or []
    if "sparse" in mlp:
        pool = config.get("moe_expert_pool") == "global"
        experts = (f"one global pool of {config.get('moe_pool_size')} FFN experts shared by all sparse layers" if pool
                   else f"{config.get('num_experts')} FFN experts per layer")
        facts.append(f"Mixture of Experts in {mlp.count('sparse')} of {len(mlp)} layers: {experts}, "
                     f"router `{config.get('moe_router')}`"
                     + ("" if config.get("moe_router") == "relu_rmsnorm" else f" (top-{config.get('num_experts_per_tok')})")
                     + f", expert width {config.get('moe_intermediate_size')}"
                     + (", learned router bias" if config.get("moe_router_bias") else ""))
        zero_computation = [f"{config.get(f'moe_{kind}_experts')} {kind}" for kind in ("zero", "copy", "constant")
                            if config.get(f"moe_{kind}_experts")]
        if zero_computation:
            facts.append("Zero-computation experts (MoE++): " + ", ".join(zero_computation)
                         + ("; gating residuals" if config.get("moe_gating_residual") else ""))
        if config.get("num_shared_experts"):
            facts.append(f"Shared expert of width {config.get('shared_expert_intermediate_size')}"
                         + (" with a sigmoid gate" if config.get("shared_expert_gate") else ""))
        if config.get("moe_preset"):
            facts.append(f"Preset: `{config['moe_preset']}`")
    method = config.get("sparse_attn_method")
    if method == "seer":
        selection = config.get("sparse_attn_selection")
        rule = {"threshold": f"gate probability > {config.get('sparse_attn_threshold')}",
                "topk": f"top-{config.get('sparse_attn_topk')} key blocks",
                "budget": f"{config.get('sparse_attn_token_budget')} tokens"}.get(selection, selection)
        facts.append(f"SeerAttention block gates (blocks of {config.get('sparse_attn_block_size')} tokens): prefill "
                     f"computes the key blocks the gate selects ({rule}; first and diagonal block always kept); "
                     "decoding attends the whole cache")
    elif method == "flux":
        facts.append(f"Flux layer routers: per input, each attention layer runs full attention or "
                     f"{config.get('sparse_attn_sink_blocks')} sink + {config.get('sparse_attn_window_blocks')} local "
                     f"blocks of {config.get('sparse_attn_block_size')} tokens (target sparse share "
                     f"{config.get('sparse_attn_target_sparsity')}); the prompt's choice holds while decoding")
    return facts


def _template_text() -> str:
    return resources.files("hf_arch.model_cards").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")


def build_model_card(model_dir: str | os.PathLike, *, repo_id: str | None = None):
    """The card as a ``huggingface_hub.ModelCard`` (its metadata parsed back from the rendered YAML)."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    variables, metadata = _context(Path(model_dir), repo_id)
    card_data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    environment = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    content = environment.from_string(_template_text()).render(card_data=card_data.to_yaml(), **variables)
    content = re.sub(r"\n{3,}", "\n\n", content)
    return ModelCard(content)  # parses the front matter: raises on invalid YAML


def render_model_card(model_dir: str | os.PathLike, *, repo_id: str | None = None) -> str:
    """README.md text (YAML front matter + body) for the checkpoint in ``model_dir``."""
    return str(build_model_card(model_dir, repo_id=repo_id))


def write_model_card(model_dir: str | os.PathLike, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write ``model_dir/README.md`` atomically (temp file + rename); refuse to replace one unless ``overwrite``."""
    model_dir = Path(model_dir)
    target = model_dir / "README.md"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    text = render_model_card(model_dir, repo_id=repo_id)
    fd, tmp_name = tempfile.mkstemp(prefix=".README.md.", suffix=".tmp", dir=model_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        if overwrite:
            os.replace(tmp_name, target)
        else:
            try:  # link fails if a README.md appeared meanwhile: never clobber one we did not mean to
                os.link(tmp_name, target)
            except FileExistsError:
                raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it") from None
            except OSError:  # filesystems without hard links
                os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _display_name(model_dir: Path) -> str:
    """The recipe runner writes ``<run>/final``: name the card after the run, not after ``final``."""
    resolved = model_dir.resolve()
    return resolved.parent.name if resolved.name == "final" else resolved.name
