"""Self-contained ``trust_remote_code`` files for exported checkpoints (loadable where hf-arch is not installed).

``export_remote_code(model_dir)`` writes ``configuration_hf_arch.py`` and ``modeling_hf_arch.py`` next to the weights
and adds an ``auto_map`` to ``config.json``, so that::

    AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)

works on a machine with only torch + transformers. The two files are generated at runtime by concatenating the
*source* of our own modules (``inspect.getsource``) in dependency order: imports of our own package are dropped,
``from __future__`` imports are hoisted, third-party imports are hoisted and deduplicated. The generated code is
checked to compile, to reference no ``hf_arch`` module and to bind no top-level name twice.

The modeling file's modules are found, not listed: the backbone, the registered mixers and routers and the variant's
module, with everything they import from the package (``modeling_modules``), so a mixer registered by another package
is exported too. Config-side helper modules go in ``CONFIG_MODULES``. The generator raises, naming the module and the
missing name, when a module imports something that ends up in neither file.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

from .atomic_io import atomic_write_text
from .registry import VARIANTS, Variant, get_variant

PACKAGE = __name__.split(".")[0]  # "hf_arch"
CONFIG_FILENAME = "configuration_hf_arch.py"
MODELING_FILENAME = "modeling_hf_arch.py"
_CONFIG_STEM = CONFIG_FILENAME[: -len(".py")]
_MODELING_STEM = MODELING_FILENAME[: -len(".py")]

# ------------------------------------------------------------------------------------------------------------------
# The configuration file's modules, in dependency order. The variant's config class is added from its own module
# (only the config classes of that module go there), so keep helpers that a config class needs in a module listed
# here. The modeling file's modules are found (MODELING_ROOTS below).
# ------------------------------------------------------------------------------------------------------------------
CONFIG_MODULES: list[str] = [
    f"{PACKAGE}.configuration",
    f"{PACKAGE}.models.moe_presets",
]
# The modeling file: the backbone, every registered token / channel mixer and MoE router of the package, and, for a
# checkpoint that uses a mixer or router registered by another package, that mixer's module; each with the modules
# it imports from (``modeling_modules``), in dependency order. Nothing to list for a new mixer or variant.
MODELING_ROOTS: list[str] = [f"{PACKAGE}.models.backbone"]

_OWN_REFERENCE = re.compile(rf"\b{PACKAGE}\b")
# transformers' own regexes for relative imports (dynamic_module_utils.get_relative_imports): any match must name a
# file we ship, or loading fails with a missing-file error on the user's machine.
_RELATIVE_IMPORT_PATTERNS = (
    re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
    re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE),
)


class RemoteCodeError(RuntimeError):
    """The generator could not produce self-contained remote code (a bug in the module table or in a module)."""


# ------------------------------------------------------------------------------------------------------------------
# Source generation
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class _Section:
    """The kept top-level code of one of our modules, for one of the two output files."""

    module: str
    doc: str | None
    chunks: list[str] = field(default_factory=list)


@dataclass
class _FileBuilder:
    filename: str
    future: list[str] = field(default_factory=list)  # feature names, in order of first appearance
    imports: dict[str, tuple[ast.stmt, str]] = field(default_factory=dict)  # ast.dump -> (node, original text)
    sections: list[_Section] = field(default_factory=list)
    bindings: dict[str, str] = field(default_factory=dict)  # top-level name -> what binds it ("import:<key>" | module)
    own_imports: dict[str, str] = field(default_factory=dict)  # name imported from our package -> importing module

    def bind(self, name: str, what: str, module: str) -> None:
        previous = self.bindings.get(name)
        if previous is not None and previous != what:
            raise RemoteCodeError(
                f"{self.filename}: top-level name {name!r} is bound both by {previous} and by {what} (in {module}); "
                "flattening the modules into one file would make one shadow the other — rename one of them"
            )
        self.bindings[name] = what

    def render(self, title: str, extra_imports: list[str]) -> str:
        from . import __version__

        body = []
        for section in self.sections:
            header = [f"# {'-' * 110}", f"# {_display_name(section.module)}"]
            if section.doc:
                header += [f"#   {line}".rstrip() for line in section.doc.strip().splitlines()]
            header.append(f"# {'-' * 110}")
            body.append("\n" + "\n".join(header) + "\n" + "\n".join(section.chunks).strip("\n") + "\n")
        body_text = "\n".join(body)
        out = [f'"""{title}\n\nGenerated by hf-arch {__version__} from its own source; do not edit by hand."""\n']
        if self.future:
            out.append(f"from __future__ import {', '.join(self.future)}\n")
        out.append("\n".join(_pruned_imports(self.imports.values(), body_text)) + "\n")
        if extra_imports:
            out.append("\n".join(extra_imports) + "\n")
        text = "\n".join(out) + "\n" + body_text
        return re.sub(r"\n{4,}", "\n\n\n", text)


def _pruned_imports(imports, body_text: str) -> list[str]:
    """Hoisted import statements, minus the names the kept code never uses (e.g. a dropped class's base)."""
    used = {n.id for n in ast.walk(ast.parse(body_text)) if isinstance(n, ast.Name)}
    kept = []
    for node, text in imports:
        names = [a for a in node.names if (a.asname or a.name).split(".")[0] in used]
        if len(names) == len(node.names):
            kept.append(text)  # untouched: keep the original text and its comments
        elif names:
            kept.append(ast.unparse(type(node)(**{**node.__dict__, "names": names})))
    return kept


def _display_name(module: str) -> str:
    """``hf_arch.layers.norm`` -> ``layers/norm.py`` (the generated files must not mention the package name)."""
    return module.split(".", 1)[1].replace(".", "/") + ".py" if "." in module else module + ".py"


def _is_own(module: str | None, level: int, importer: str = PACKAGE) -> bool:
    """A relative import, or one of our package or of the importing module's own package (a registered extension)."""
    if level > 0 or module is None:
        return level > 0
    return any(module == top or module.startswith(top + ".") for top in {PACKAGE, importer.split(".")[0]})


def _own_dependencies(module_name: str) -> list[str]:
    """The modules ``module_name`` imports names from at top level, within our package or its own (resolved
    absolute names; the package root, which only re-exports, is left out)."""
    module = importlib.import_module(module_name)
    package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
    found = []
    for node in ast.parse(inspect.getsource(module)).body:
        if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
            continue
        if not _is_own(node.module, node.level, module_name):
            continue
        if node.level:
            parts = package.split(".")
            target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            target = node.module
        if target not in (PACKAGE, module_name.split(".")[0]):
            found.append(target)
    return found


def modeling_modules(roots, skip=()) -> list[str]:
    """``roots`` and every module they import from (``_own_dependencies``), each after its dependencies; modules in
    ``skip`` (the configuration file's) and their dependencies are left out."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered or name in skip or name in visiting:
            return
        visiting.add(name)
        for dependency in _own_dependencies(name):
            visit(dependency)
        visiting.discard(name)
        ordered.append(name)

    for root in roots:
        visit(root)
    return ordered


def _registered_layer_modules(config: dict | None) -> list[str]:
    """Modules of the registered token / channel mixers, MoE routers and attention scores / features: all of the
    package's own; another package's only where ``config`` (a saved config.json) uses them."""
    from .layers.attention_registry import ATTENTION_FEATURES, ATTENTION_SCORES
    from .layers.mixer_registry import CHANNEL_MIXERS, TOKEN_MIXERS
    from .layers.moe_routers import MOE_ROUTERS

    used = set()
    if config:
        used |= set(config.get("token_mixer_types") or ()) | set(config.get("channel_mixer_types") or ())
        used |= {config.get("moe_router"), config.get("attn_score_function")}
        saved = types.SimpleNamespace(**config)
        used |= {name for name, cls in ATTENTION_FEATURES.items() if cls.spec.is_on(saved)}
    modules = []
    for table in (TOKEN_MIXERS, CHANNEL_MIXERS, MOE_ROUTERS, ATTENTION_SCORES, ATTENTION_FEATURES):
        for name, cls in table.items():
            if cls.__module__.split(".")[0] == PACKAGE or name in used:
                modules.append(cls.__module__)
    return list(dict.fromkeys(modules))


def _statement_bindings(node: ast.stmt) -> list[str]:
    """Top-level names a (non-import) statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    names: list[str] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.append(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.extend((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            names.append(sub.name)
    return names


def _add_module(builder: _FileBuilder, module_name: str, keep) -> list[str]:
    """Append the statements of ``module_name`` for which ``keep(name, obj)`` is true (non-class statements always).

    Returns the names of the classes that ``keep`` rejected.
    """
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines()
    section = _Section(module_name, ast.get_docstring(tree, clean=True))
    rejected: list[str] = []
    previous_end = 0
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):  # module docstring: rendered as a comment header instead
        previous_end = body[0].end_lineno
        body = body[1:]
    for node in body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        prefix_lines = lines[previous_end : start - 1]  # blank lines and comments before the statement
        text = "\n".join(lines[start - 1 : node.end_lineno])
        previous_end = node.end_lineno
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                if alias.name not in builder.future:
                    builder.future.append(alias.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            own = _is_own(node.module, node.level, module_name) if isinstance(node, ast.ImportFrom) else any(
                _is_own(a.name, 0, module_name) for a in node.names
            )
            if own:
                _record_own_import(builder, module_name, node)
                continue
            key = ast.dump(node)
            for alias in node.names:
                # Two statements importing the same object under the same name do not conflict.
                source = f"from {node.module} import {alias.name}" if isinstance(node, ast.ImportFrom) else f"import {alias.asname or alias.name.split('.')[0]}"
                builder.bind((alias.asname or alias.name).split(".")[0], f"import `{source}`", module_name)
            builder.imports.setdefault(key, (node, text))
            continue
        if _statement_bindings(node) == ["__all__"]:  # each module's export list means nothing once flattened
            continue
        if isinstance(node, ast.ClassDef) and not keep(node.name, getattr(module, node.name, None)):
            rejected.append(node.name)
            continue
        for name in _statement_bindings(node):
            builder.bind(name, f"{_display_name(module_name)}", module_name)
        section.chunks.append("\n".join(prefix_lines + [text]) if section.chunks else text)
    trailing = "\n".join(lines[previous_end:])
    if trailing.strip():
        section.chunks.append(trailing)
    builder.sections.append(section)
    return rejected


def _record_own_import(builder: _FileBuilder, module_name: str, node: ast.Import | ast.ImportFrom) -> None:
    if isinstance(node, ast.Import):
        raise RemoteCodeError(
            f"{module_name}: `{ast.unparse(node)}` imports our package as a module object; the remote-code generator "
            "only supports `from .x import Name` imports of our own modules"
        )
    for alias in node.names:
        if alias.name == "*" or (alias.asname and alias.asname != alias.name):
            raise RemoteCodeError(
                f"{module_name}: `{ast.unparse(node)}` — star imports and renaming imports of our own modules are not "
                "supported by the remote-code generator; import the name as is"
            )
        builder.own_imports.setdefault(alias.name, module_name)


def _is_config_class(obj) -> bool:
    from transformers import PreTrainedConfig

    return isinstance(obj, type) and issubclass(obj, PreTrainedConfig)


def _is_sequence_classification_class(obj) -> bool:
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(obj, type) and (
        issubclass(obj, GenericForSequenceClassification) or obj.__name__.endswith("ForSequenceClassification")
    )


def _is_other_variants_class(obj, variant: Variant) -> bool:
    """A class registered for a variant other than ``variant`` (when several variants share a module)."""
    mine = {variant.config_class, variant.model_class, variant.causal_lm_class, variant.sequence_classification_class}
    for other in VARIANTS.values():
        if other is variant:
            continue
        theirs = {other.config_class, other.model_class, other.causal_lm_class, other.sequence_classification_class}
        if obj in theirs and obj not in mine:
            return True
    return False


def _check_generated(filename: str, text: str, allowed_relative: set[str]) -> None:
    match = _OWN_REFERENCE.search(text)
    if match:
        line_no = text.count("\n", 0, match.start()) + 1
        raise RemoteCodeError(
            f"generated {filename} still references {PACKAGE!r} at line {line_no}: "
            f"{text.splitlines()[line_no - 1].strip()!r} — the remote code must not depend on the package"
        )
    try:
        tree = compile(text, filename, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
        compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as err:
        raise RemoteCodeError(f"generated {filename} does not compile: {err}") from err
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0 and not (
            node.level == 1 and node.module in allowed_relative
        ):
            raise RemoteCodeError(f"generated {filename} keeps the relative import `{ast.unparse(node)}`")
    for pattern in _RELATIVE_IMPORT_PATTERNS:
        for name in pattern.findall(text):
            if name not in allowed_relative:
                raise RemoteCodeError(
                    f"generated {filename} has a line transformers reads as a relative import of {name!r}; "
                    "transformers would look for a file that is not shipped"
                )


def build_remote_code_sources(variant_name_or_model_type: str, config: dict | None = None) -> dict[str, str]:
    """``{"configuration_hf_arch.py": ..., "modeling_hf_arch.py": ...}`` for one variant (``config``: the saved
    config.json, whose mixers registered by other packages are exported too).

    Built once per variant and module list in a process (every save_pretrained writes them; flattening takes ~1 s).
    """
    variant = get_variant(variant_name_or_model_type)
    roots = [*MODELING_ROOTS, *_registered_layer_modules(config), variant.model_class.__module__,
             variant.causal_lm_class.__module__]
    modules = modeling_modules(roots, skip=set(CONFIG_MODULES))
    return dict(_build_sources(variant.model_type, tuple(CONFIG_MODULES), tuple(modules)))


@functools.lru_cache(maxsize=None)
def _build_sources(model_type: str, config_modules: tuple[str, ...], model_modules: tuple[str, ...]) -> dict:
    """The uncached builder of ``build_remote_code_sources`` (the tables are part of the key).

    The configuration file holds the backbone config base class and the variant's config class; the modeling file
    holds the layers, the backbone and the variant's Model / ForCausalLM classes (no ForSequenceClassification: it
    needs the AutoModel registration of the package) and imports its config classes from the configuration file.
    Raises ``KeyError`` for an unknown variant and ``RemoteCodeError`` if the sources cannot be flattened.
    """
    variant = get_variant(model_type)

    # ---- configuration file: CONFIG_MODULES whole, then only the config classes of the variant's module(s).
    config = _FileBuilder(CONFIG_FILENAME)
    for name in config_modules:
        _add_module(config, name, keep=lambda n, obj: not _is_other_variants_class(obj, variant))
    if variant.config_class.__module__ not in CONFIG_MODULES:
        _config_class_only(
            config,
            variant.config_class.__module__,
            keep=lambda n, obj: _is_config_class(obj) and not _is_other_variants_class(obj, variant),
        )
    _check_own_imports(config, provided=set(config.bindings), where=f"CONFIG_MODULES of {__name__}")
    if variant.config_class.__name__ not in config.bindings:
        raise RemoteCodeError(f"{variant.config_class.__name__} did not end up in {CONFIG_FILENAME}")

    # ---- modeling file: the modules found from the roots (variant module last); config classes come by import.
    modeling = _FileBuilder(MODELING_FILENAME)
    moved_configs: set[str] = set()

    def keep_model(name, obj) -> bool:
        if _is_config_class(obj):
            moved_configs.add(name)
            return False
        return not (_is_sequence_classification_class(obj) or _is_other_variants_class(obj, variant))

    dropped: set[str] = set()
    for name in model_modules:
        dropped.update(_add_module(modeling, name, keep=keep_model))
    dropped -= moved_configs
    for cls in (variant.model_class, variant.causal_lm_class):
        if cls.__name__ not in modeling.bindings:
            raise RemoteCodeError(f"{cls.__name__} did not end up in {MODELING_FILENAME}")

    from_config = sorted(
        {n for n in modeling.own_imports if n in config.bindings and n not in modeling.bindings}
        | {n for n in moved_configs if n in config.bindings}
    )
    _check_own_imports(
        modeling, provided=set(modeling.bindings) | set(from_config) | dropped, where="the modules they import"
    )
    for name in from_config:
        modeling.bind(name, f"import from {CONFIG_FILENAME}", MODELING_FILENAME)
    extra = [f"from .{_CONFIG_STEM} import {', '.join(from_config)}"] if from_config else []

    sources = {
        CONFIG_FILENAME: config.render(
            f"Configuration of the {variant.name} variant ({variant.model_type}) for trust_remote_code loading.", []
        ),
        MODELING_FILENAME: modeling.render(
            f"Modeling code of the {variant.name} variant ({variant.model_type}) for trust_remote_code loading.",
            extra,
        ),
    }
    _check_generated(CONFIG_FILENAME, sources[CONFIG_FILENAME], allowed_relative=set())
    _check_generated(MODELING_FILENAME, sources[MODELING_FILENAME], allowed_relative={_CONFIG_STEM})
    _check_no_dropped_use(MODELING_FILENAME, sources[MODELING_FILENAME], dropped - set(modeling.bindings))
    return sources


def _check_no_dropped_use(filename: str, text: str, dropped: set[str]) -> None:
    """Classes left out on purpose (ForSequenceClassification, other variants) must not be used by kept code."""
    used = sorted({n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name) and n.id in dropped})
    if used:
        raise RemoteCodeError(f"generated {filename} uses {used}, which the generator leaves out of the remote code")


def _config_class_only(builder: _FileBuilder, module_name: str, keep) -> None:
    """Add only the config classes of a mixed module (a variant module that also defines model classes)."""
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines()
    section = _Section(module_name, ast.get_docstring(tree, clean=True))
    imported: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                imported[(alias.asname or alias.name).split(".")[0]] = node
    defined_here = {name for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))
                    for name in _statement_bindings(node)}
    kept = {node.name for node in tree.body
            if isinstance(node, ast.ClassDef) and keep(node.name, getattr(module, node.name, None))}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in kept):
            continue
        # Names the class uses that the module imports: bring those imports along (own ones must resolve in the file).
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        left_behind = sorted((used & defined_here) - kept)
        if left_behind:
            raise RemoteCodeError(
                f"{node.name} (in {module_name}) uses {left_behind}, defined beside it; only the config classes of that "
                f"module go to {CONFIG_FILENAME}: move them into the class or into a module in CONFIG_MODULES"
            )
        for name in sorted(used & set(imported)):
            imp = imported[name]
            if isinstance(imp, ast.ImportFrom) and imp.module == "__future__":
                continue
            own = _is_own(imp.module, imp.level, module_name) if isinstance(imp, ast.ImportFrom) else any(
                _is_own(a.name, 0, module_name) for a in imp.names
            )
            if own:
                _record_own_import(builder, module_name, imp)
            else:
                builder.bind(name, f"import `{ast.unparse(imp)}`", module_name)
                builder.imports.setdefault(ast.dump(imp), (imp, "\n".join(lines[imp.lineno - 1 : imp.end_lineno])))
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        builder.bind(node.name, _display_name(module_name), module_name)
        section.chunks.append("\n\n" + "\n".join(lines[start - 1 : node.end_lineno]))
    builder.sections.append(section)


def _check_own_imports(builder: _FileBuilder, provided: set[str], where: str) -> None:
    missing = {name: module for name, module in builder.own_imports.items() if name not in provided}
    if missing:
        details = "; ".join(f"{module} imports {name!r}" for name, module in sorted(missing.items()))
        raise RemoteCodeError(
            f"{builder.filename}: {details}, but no module of the generated file defines it (looked in {where}) — "
            "import it from the module that defines it (not from a package's __init__)"
        )


# ------------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------------


def auto_map_for(variant_name_or_model_type: str) -> dict[str, str]:
    """The ``auto_map`` entries ``export_remote_code`` adds to config.json."""
    variant = get_variant(variant_name_or_model_type)
    return {
        "AutoConfig": f"{_CONFIG_STEM}.{variant.config_class.__name__}",
        "AutoModel": f"{_MODELING_STEM}.{variant.model_class.__name__}",
        "AutoModelForCausalLM": f"{_MODELING_STEM}.{variant.causal_lm_class.__name__}",
    }


def export_remote_code(model_dir: str | os.PathLike) -> list[Path]:
    """Make a saved checkpoint loadable with ``trust_remote_code=True`` where hf-arch is not installed.

    Reads ``model_dir/config.json``, writes ``configuration_hf_arch.py`` and ``modeling_hf_arch.py`` next to it and
    adds ``auto_map`` (AutoConfig / AutoModel / AutoModelForCausalLM) to config.json, keeping every other key (and
    other ``auto_map`` entries). All writes are atomic. Returns the paths written (the two files, then config.json).
    With hf-arch installed, loading without ``trust_remote_code`` still uses the installed classes.
    """
    directory = Path(model_dir)
    if not directory.exists():
        raise FileNotFoundError(f"export_remote_code: model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"export_remote_code: {str(directory)!r} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"export_remote_code: no config.json in {str(directory)!r}; save the model (save_pretrained) first"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"export_remote_code: {str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"export_remote_code: {str(config_path)!r} does not hold a JSON object")
    model_type = config.get("model_type")
    try:
        variant = get_variant(model_type) if isinstance(model_type, str) else None
    except KeyError:
        variant = None
    if variant is None or variant.model_type != model_type:
        known = ", ".join(sorted(v.model_type for v in VARIANTS.values())) or "(none registered)"
        raise ValueError(
            f"export_remote_code: {str(config_path)!r} has model_type {model_type!r}, which is not an hf-arch variant "
            f"(known model types: {known})"
        )

    sources = build_remote_code_sources(variant.model_type, config)
    written = []
    for filename, text in sources.items():
        path = directory / filename
        atomic_write_text(path, text)
        written.append(path)
    auto_map = dict(config.get("auto_map") or {})
    auto_map.update(auto_map_for(variant.model_type))
    config["auto_map"] = auto_map
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written.append(config_path)
    return written


__all__ = [
    "CONFIG_FILENAME",
    "CONFIG_MODULES",
    "MODELING_FILENAME",
    "MODELING_ROOTS",
    "RemoteCodeError",
    "auto_map_for",
    "build_remote_code_sources",
    "export_remote_code",
    "modeling_modules",
]
