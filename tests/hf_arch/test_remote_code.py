"""Exported checkpoints load with trust_remote_code=True where hf_arch is not importable, and match bit for bit."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_arch
from hf_arch.registry import example_layouts
from hf_arch import remote_code
from hf_arch.remote_code import (
    CONFIG_FILENAME,
    MODELING_FILENAME,
    RemoteCodeError,
    build_remote_code_sources,
    export_remote_code,
)

PACKAGE_DIR = Path(hf_arch.__file__).resolve().parent
INPUT_IDS = [[5, 17, 99, 3, 42, 8, 120, 64, 7, 33, 2, 91]]
NEW_TOKENS = 6

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "headwise_tied": dict(TINY, attn_output_gate="headwise", tie_word_embeddings=True),
    "elementwise_lowrank_qknorm_bias_sliding": dict(
        TINY,
        attn_output_gate="elementwise",
        attn_output_gate_rank=8,
        attn_output_gate_bias=True,
        attn_output_gate_bias_init=0.5,
        qk_norm=True,
        attention_bias=True,
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
    ),
    # Linear variants: the flattened PyTorch kernels, the linear cache and the intra-layer window branch.
    "gla_all_linear": dict(TINY, variant="gla"),
    "gated_deltanet_lizard_hybrid": dict(
        TINY, variant="gated_deltanet", linear_attn_hybrid="lizard", sliding_window=4, linear_attn_num_sinks=2,
        full_attention_layers=[1],
    ),
    # LoLCATs' shared denominator: the window's softmax mass and the delayed linear inputs in a second state slot.
    "gla_lolcats_hybrid": dict(
        TINY, variant="gla", linear_attn_gate="none", linear_attn_feature_map="hedgehog", linear_attn_normalize=True,
        linear_attn_hybrid="lolcats", sliding_window=4, linear_attn_mix_weights=[1.0, 0.3],
    ),
    # MoE: the grouped PyTorch expert path, zero-computation experts, gating residuals, the global pool.
    "moe_plus_plus_shared_expert": dict(TINY, variant="moe", moe_preset="moe_plus_plus", num_shared_experts=1,
                                        shared_expert_gate=True, moe_intermediate_size=32),
    "moe_unipool_dense_first": dict(TINY, variant="moe", moe_preset="unipool", mlp_layer_types=["dense", "sparse"],
                                    moe_pool_size=3, moe_intermediate_size=32),
    # The papers' routers: Read-ME's model-level pre-gate, Sinkhorn's potentials, THOR's projection (buffers), DynaMoE.
    "moe_read_me_pre_gate": dict(TINY, variant="moe", moe_router="pre_gated", moe_pre_gate_hidden=16,
                                 moe_intermediate_size=32),
    "moe_sinkhorn": dict(TINY, variant="moe", moe_preset="sinkhorn", moe_intermediate_size=32),
    "moe_thor": dict(TINY, variant="moe", moe_preset="thor", moe_intermediate_size=32),
    "moe_dynamic_pyramid": dict(TINY, variant="moe", moe_router="dynamic_topk", moe_dynamic_k="complexity",
                                moe_capacity_schedule="pyramid", moe_intermediate_size=32),
    # The ACM and VersatileFFN channel mixers of the hybrid variant.
    "hybrid_acm_versatile": dict(TINY, variant="hybrid", channel_mixer_types=["acm", "versatile"],
                                 mixer_options={"acm": {"learners": 2}, "versatile": {"virtual_experts": 2,
                                                                                       "top_k": 1}}),
    # Learned sparse attention (block-sparse prefill through the flattened PyTorch kernel) and the score variants.
    "seer_topk": dict(TINY, variant="sparse_attention", sparse_attn_method="seer", sparse_attn_block_size=4,
                      sparse_attn_selection="topk", sparse_attn_topk=1),
    "sa_softmax_normalized": dict(TINY, variant="sa_softmax", attn_score_function="sa_softmax_normalized"),
    "affine_gqa": dict(TINY, variant="affine_attention", attn_affine_init="normal"),
    "move_bank": dict(TINY, variant="move", move_num_slots=4, move_init="normal"),
    "grouped_diff_gated": dict(TINY, variant="diff_attention", diff_attn_noise_heads=1, attn_output_gate="headwise"),
    "cubit_krr": dict(TINY, variant="cubit", krr_ridge=0.5),
    "sas_simulated_heads": dict(TINY, variant="sas"),
    "geonorm_geodesic": dict(TINY, variant="geonorm"),
    # Every registered variant's own examples (hf_arch.registry.example_layouts), e.g. hybrid's GDN : MLA + MoE.
    **{name: dict(TINY, variant=variant, **fields) for name, (variant, fields) in example_layouts().items()},
}

# Runs in a fresh interpreter where hf_arch is hidden. Prints one line "RESULT:<json>".
SUBPROCESS_SCRIPT = textwrap.dedent(
    r"""
    import json, sys

    # 1) The PYTHONPATH shadow package raises on import. 2) The editable install's meta-path finder (appended after
    # PathFinder by a .pth file) is removed and a blocker goes first, so nothing can bring the real package back.
    class _Block:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "hf_arch" or name.startswith("hf_arch."):
                raise ImportError("hf_arch hidden (meta path)")
            return None

    sys.meta_path[:] = [
        f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()
    ]
    sys.meta_path.insert(0, _Block)
    try:
        import hf_arch  # noqa: F401
    except ImportError as err:
        hidden = str(err)
    else:
        raise SystemExit("hf_arch is importable in the subprocess: " + repr(hf_arch))

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, input_ids, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    leaked = sorted(m for m in sys.modules if m == "hf_arch" or m.startswith("hf_arch."))
    print("RESULT:" + json.dumps({
        "hidden": hidden,
        "leaked": leaked,
        "config_module": type(config).__module__,
        "config_class": type(config).__name__,
        "model_module": type(model).__module__,
        "model_class": type(model).__name__,
        "inner_module": type(model.model).__module__,
        "logits": logits.tolist(),
        "tokens": tokens.tolist(),
    }))
    """
)


# What a machine with only torch + transformers has: the standard library and those two.
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {"torch", "transformers"}


def _hidden_env(tmp_path: Path) -> dict[str, str]:
    shadow = tmp_path / "shadow"
    (shadow / "hf_arch").mkdir(parents=True, exist_ok=True)
    (shadow / "hf_arch" / "__init__.py").write_text('raise ImportError("hf_arch hidden")\n')
    env = dict(os.environ)
    env.pop("HF_MODULES_CACHE", None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join([str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def _run_hidden(tmp_path: Path, model_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(model_dir), json.dumps(INPUT_IDS), str(NEW_TOKENS)],
        cwd=tmp_path,
        env=_hidden_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, f"no RESULT line:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT:") :])


def _save_tiny(tmp_path: Path, config_kwargs: dict) -> tuple[torch.nn.Module, Path]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config_kwargs = dict(config_kwargs)
    config_class = hf_arch.get_variant(config_kwargs.pop("variant", "gated_attention")).config_class
    model = AutoModelForCausalLM.from_config(config_class(**config_kwargs)).eval()
    model_dir = tmp_path / "exported_gated"
    model.save_pretrained(model_dir)
    return model, model_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_remote_code_matches_installed_package(tmp_path, name):
    model, model_dir = _save_tiny(tmp_path, CONFIGS[name])
    written = export_remote_code(model_dir)
    assert [p.name for p in written] == [CONFIG_FILENAME, MODELING_FILENAME, "config.json"]

    _assert_hidden_load_matches(model, _run_hidden(tmp_path, model_dir))


def _assert_hidden_load_matches(model, result: dict) -> None:
    """The subprocess loaded the flat remote code (not hf_arch) and reproduced ``model``'s logits and greedy tokens."""
    assert "hf_arch hidden" in result["hidden"]
    assert result["leaked"] == []
    for key in ("config_module", "model_module", "inner_module"):
        assert result[key].startswith("transformers_modules."), result
    assert result["config_module"].endswith("." + CONFIG_FILENAME[:-3])
    assert result["model_module"].endswith("." + MODELING_FILENAME[:-3])
    assert (result["config_class"], result["model_class"]) == (type(model.config).__name__, type(model).__name__)

    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        expected_logits = model(ids).logits
        expected_tokens = model.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    remote_logits = torch.tensor(result["logits"], dtype=expected_logits.dtype)
    assert remote_logits.shape == expected_logits.shape
    assert (remote_logits - expected_logits).abs().max().item() <= 1e-5
    assert result["tokens"] == expected_tokens.tolist()
    assert len(result["tokens"][0]) == len(INPUT_IDS[0]) + NEW_TOKENS


# A softmax variant, a linear hybrid and an MoE: the three families of flattened code.
SAVED_WITHOUT_EXPORT = ["headwise_tied", "gated_deltanet_lizard_hybrid", "moe_unipool_dense_first"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAVED_WITHOUT_EXPORT)
def test_plain_save_pretrained_carries_remote_code(tmp_path, name):
    """No ``hf-arch convert`` and no export call: ``save_pretrained`` of a from-config model alone loads with
    ``trust_remote_code=True`` where hf_arch cannot be imported, with the same logits."""
    model, model_dir = _save_tiny(tmp_path, CONFIGS[name])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == remote_code.auto_map_for(model.config.model_type)
    sources = build_remote_code_sources(model.config.model_type)
    for filename in (CONFIG_FILENAME, MODELING_FILENAME):
        assert (model_dir / filename).read_text() == sources[filename]
    _assert_hidden_load_matches(model, _run_hidden(tmp_path, model_dir))


def test_save_pretrained_writes_remote_code_only_where_asked(tmp_path, tiny_gated_model):
    def saved(directory, *args, **kwargs):
        tiny_gated_model.save_pretrained(directory, *args, **kwargs)
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        return sorted(p.name for p in directory.iterdir() if p.suffix == ".py"), "auto_map" in config

    assert saved(tmp_path / "main") == ([CONFIG_FILENAME, MODELING_FILENAME], True)
    assert saved(tmp_path / "not_main", is_main_process=False) == ([], False)  # other ranks: the parent's rules
    assert saved(tmp_path / "opt_out", remote_code=False) == ([], False)
    assert saved(tmp_path / "positional", False) == ([], False)  # is_main_process passed positionally
    assert not [p.name for p in (tmp_path / "main").iterdir() if p.name.startswith(".")], "temporary files left"


def test_trainer_checkpoints_carry_remote_code_and_resume(tmp_path, tiny_gated_model):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    ids = torch.randint(0, tiny_gated_model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, save_steps=1,
                report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True)
    Trainer(model=tiny_gated_model.train(), args=TrainingArguments(**args), train_dataset=data).train()
    for step in (1, 2):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / MODELING_FILENAME).is_file() and (checkpoint / CONFIG_FILENAME).is_file()
        assert "auto_map" in json.loads((checkpoint / "config.json").read_text())
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-1").train()
    args.update(max_steps=3)
    Trainer(model=resumed, args=TrainingArguments(**args), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert (tmp_path / "run" / "checkpoint-3" / MODELING_FILENAME).is_file()


def test_installed_package_still_wins_without_trust_remote_code(tmp_path, tiny_gated_model):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "m"
    tiny_gated_model.save_pretrained(model_dir)
    export_remote_code(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(reloaded) is hf_arch.GatedAttentionForCausalLM
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tiny_gated_model(ids).logits, rtol=0, atol=0)


def test_export_rewrites_config_keeping_keys(tmp_path, tiny_gated_model):
    model_dir = tmp_path / "m"
    tiny_gated_model.save_pretrained(model_dir)
    config_path = model_dir / "config.json"
    before = json.loads(config_path.read_text())
    before["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    config_path.write_text(json.dumps(before, indent=2))

    export_remote_code(model_dir)
    first = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    export_remote_code(model_dir)  # idempotent
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == first
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"

    after = json.loads(config_path.read_text())
    assert {k: v for k, v in after.items() if k != "auto_map"} == {k: v for k, v in before.items() if k != "auto_map"}
    assert after["auto_map"] == {
        "AutoTokenizer": ["tokenization_x.XTokenizer", None],
        "AutoConfig": "configuration_hf_arch.GatedAttentionConfig",
        "AutoModel": "modeling_hf_arch.GatedAttentionModel",
        "AutoModelForCausalLM": "modeling_hf_arch.GatedAttentionForCausalLM",
    }
    sources = build_remote_code_sources("gated_attention")
    assert first[CONFIG_FILENAME].decode() == sources[CONFIG_FILENAME]
    assert first[MODELING_FILENAME].decode() == sources[MODELING_FILENAME]


@pytest.mark.parametrize("key", ["gated_attention", "hfa_gated_attention"])
def test_generated_sources_are_self_contained(key):
    sources = build_remote_code_sources(key)
    assert set(sources) == {CONFIG_FILENAME, MODELING_FILENAME}
    for filename, text in sources.items():
        assert not re.search(r"\bhf_arch\b", text), filename
        tree = ast.parse(text)
        compile(tree, filename, "exec")
        # __future__ first (after the docstring), once; no import statement duplicated.
        first = tree.body[1]
        assert isinstance(first, ast.ImportFrom) and first.module == "__future__"
        assert sum(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in ast.walk(tree)) == 1
        top_imports = [ast.dump(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert len(top_imports) == len(set(top_imports)), filename
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert filename == MODELING_FILENAME and (node.level, node.module) == (1, "configuration_hf_arch")
                else:
                    assert node.module.split(".")[0] in ALLOWED_IMPORTS, ast.unparse(node)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ALLOWED_IMPORTS for a in node.names), ast.unparse(node)
        defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert not any("SequenceClassification" in name for name in defined)
        assert "SequenceClassification" not in text
        assert "register" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    config_defs = {n.name for n in ast.parse(sources[CONFIG_FILENAME]).body if isinstance(n, ast.ClassDef)}
    assert config_defs == {"HfArchConfig", "GatedAttentionConfig", "MoERouterSpec", "TokenMixerSpec",
                           "AttentionScoreSpec", "AttentionFeatureSpec"}
    modeling_defs = {n.name for n in ast.parse(sources[MODELING_FILENAME]).body if isinstance(n, ast.ClassDef)}
    assert {"HfArchRMSNorm", "AttentionOutputGate", "HfArchAttention", "HfArchModel", "GatedAttentionModel",
            "GatedAttentionForCausalLM"} <= modeling_defs
    assert not modeling_defs & config_defs
    assert re.search(r"from \.configuration_hf_arch import .*\bGatedAttentionConfig, HfArchConfig\b", sources[MODELING_FILENAME])


def test_generated_sources_execute_as_a_package(tmp_path, monkeypatch):
    """Import the two files as a package of their own (what transformers does) and build a model from them."""
    import importlib

    package = tmp_path / "flat_pkg_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for filename, text in build_remote_code_sources("gated_attention").items():
        (package / filename).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        modeling = importlib.import_module("flat_pkg_for_test.modeling_hf_arch")
        configuration = importlib.import_module("flat_pkg_for_test.configuration_hf_arch")
        config = configuration.GatedAttentionConfig(**CONFIGS["elementwise_lowrank_qknorm_bias_sliding"])
        torch.manual_seed(0)
        flat = modeling.GatedAttentionForCausalLM(config).eval()
        torch.manual_seed(0)
        ours = hf_arch.GatedAttentionForCausalLM(
            hf_arch.GatedAttentionConfig(**CONFIGS["elementwise_lowrank_qknorm_bias_sliding"])
        ).eval()
        assert flat.state_dict().keys() == ours.state_dict().keys()
        flat.load_state_dict(ours.state_dict())
        ids = torch.tensor(INPUT_IDS)
        with torch.no_grad():
            torch.testing.assert_close(flat(ids).logits, ours(ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="attn_output_gate"):
            configuration.GatedAttentionConfig(attn_output_gate=None)
    finally:
        for name in [m for m in sys.modules if m.startswith("flat_pkg_for_test")]:
            del sys.modules[name]


def test_generator_rejects_package_references():
    with pytest.raises(RemoteCodeError, match="hf_arch"):
        remote_code._check_generated("x.py", "def f():\n    import hf_arch.layers\n", set())
    with pytest.raises(RemoteCodeError, match="relative import"):
        remote_code._check_generated("x.py", "def f():\n    from .layers import norm\n", set())
    with pytest.raises(RemoteCodeError, match="relative import"):
        remote_code._check_generated("x.py", '"""\nfrom .layers import norm\n"""\n', set())


def test_modeling_modules_are_found_in_dependency_order():
    """No table to keep: the backbone, every registered mixer and router, and what they import, each module after
    the modules it imports from."""
    from hf_arch.layers.mixer_registry import CHANNEL_MIXERS, TOKEN_MIXERS

    roots = [*remote_code.MODELING_ROOTS, *remote_code._registered_layer_modules(None), "hf_arch.models.gated_attention"]
    modules = remote_code.modeling_modules(roots, skip=set(remote_code.CONFIG_MODULES))
    assert len(modules) == len(set(modules))
    for cls in [*TOKEN_MIXERS.values(), *CHANNEL_MIXERS.values()]:
        # The package's own mixers always; another package's only where a checkpoint uses it (test_mixer_extension).
        assert cls.__module__ in modules or not cls.__module__.startswith("hf_arch.")
    for position, module in enumerate(modules):
        for dependency in remote_code._own_dependencies(module):
            assert dependency in remote_code.CONFIG_MODULES or modules.index(dependency) < position, (module, dependency)
    assert not any("triton" in m for m in modules)  # the Triton kernels are imported lazily: remote code runs PyTorch


def test_generator_names_an_import_no_module_defines(monkeypatch):
    # Hide the norm module from the dependency walk: attention.py imports HfArchRMSNorm, now defined nowhere.
    found = remote_code._own_dependencies
    monkeypatch.setattr(remote_code, "_own_dependencies",
                        lambda name: [m for m in found(name) if not m.endswith(".norm")])
    remote_code._build_sources.cache_clear()
    with pytest.raises(RemoteCodeError, match=r"imports 'HfArchRMSNorm'.*no module of the generated file defines it"):
        build_remote_code_sources("gated_attention")
    remote_code._build_sources.cache_clear()


def test_generator_names_a_helper_a_config_class_leaves_behind(tmp_path, monkeypatch):
    """Only the config classes of a variant module go to the configuration file; a module-level helper they call
    would be a NameError at remote load (GDA's default noise heads were, on transformers 5.17)."""
    (tmp_path / "variant_with_helper.py").write_text(textwrap.dedent("""
        from transformers import PretrainedConfig

        def default_width(n):
            return 2 * n

        class HelperConfig(PretrainedConfig):
            def __init__(self, width=None, **kwargs):
                self.width = default_width(4) if width is None else width
                super().__init__(**kwargs)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    builder = remote_code._FileBuilder(CONFIG_FILENAME)
    with pytest.raises(RemoteCodeError, match=r"HelperConfig .*\['default_width'\], defined beside it"):
        remote_code._config_class_only(builder, "variant_with_helper", keep=lambda name, obj: name == "HelperConfig")
    sys.modules.pop("variant_with_helper", None)


def test_unknown_variant():
    with pytest.raises(KeyError, match="nope"):
        build_remote_code_sources("nope")


def test_export_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        export_remote_code(missing)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(str(a_file))):
        export_remote_code(a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_remote_code(empty)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        export_remote_code(bad_json)

    for model_type in ("llama", None, "gated_attention"):  # a foreign type, none, our short name (not a model_type)
        other = tmp_path / f"other_{model_type}"
        other.mkdir()
        payload = {"hidden_size": 8} if model_type is None else {"model_type": model_type}
        (other / "config.json").write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=re.escape(repr(model_type))) as info:
            export_remote_code(other)
        assert str(other / "config.json") in str(info.value)
        assert "hfa_gated_attention" in str(info.value)
        assert sorted(p.name for p in other.iterdir()) == ["config.json"], "nothing written on error"
