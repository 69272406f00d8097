"""The wheel ships every subpackage: pyproject lists packages by hand (the top-level folders install inside hf_arch),
and an editable install hides a missing entry, so check the list against the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Top-level source folders and the package each installs as (pyproject's package-dir).
FOLDERS = {"hf_arch": "hf_arch", "kernels": "hf_arch.kernels", "conversion": "hf_arch.conversion",
           "recipes": "hf_arch.recipes", "model_cards": "hf_arch.model_cards"}
# Installed as a namespace sub-package: with an __init__.py, `python -m …` from the repo root would import the folder
# as a top-level `kernels` and shadow the Hub kernels library that transformers >= 5.25 imports.
NAMESPACE_FOLDERS = {"hf_arch.kernels": "kernels"}


def _source_packages() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    return found | NAMESPACE_FOLDERS.keys()


def test_every_source_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"pyproject.toml [tool.setuptools].packages lacks {missing}: a wheel would not ship them"
    assert "hf_arch.kernels.krr" in listed  # the check sees nested kernel packages
    for package, folder in setuptools["package-dir"].items():
        if folder in NAMESPACE_FOLDERS.values():
            assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow the Hub kernels package"
        else:
            assert (ROOT / folder / "__init__.py").is_file(), f"package-dir maps {package} to {folder}, which is no package"


def test_repo_root_never_shadows_the_hub_kernels_package():
    """`python -c` / `python -m` from the repo root put it first on sys.path; our folder must still lose."""
    import subprocess
    import sys

    code = ("import importlib.util, hf_arch, hf_arch.kernels.ops; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(str(ROOT / "kernels")), origin


def test_unsupported_transformers_version_fails_loudly_by_name():
    import pytest

    from hf_arch._compat import UnsupportedTransformersVersion, check_transformers_version

    for ok in ("5.17.0", "5.25.0", "5.99.1.dev0", "5.30.0rc1"):
        check_transformers_version(ok)
    for bad in ("5.16.2", "4.57.1", "6.0.0", "6.0.0.dev0"):
        with pytest.raises(UnsupportedTransformersVersion, match=rf"transformers {bad} is installed.*>=5\.17,<6"):
            check_transformers_version(bad)
