"""The wheel ships every subpackage: pyproject lists packages by hand (the top-level folders install inside hf_arch),
and an editable install hides a missing entry, so check the list against the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Top-level source folders and the package each installs as (pyproject's package-dir).
FOLDERS = {"hf_arch": "hf_arch", "kernels": "hf_arch.kernels", "conversion": "hf_arch.conversion",
           "recipes": "hf_arch.recipes", "model_cards": "hf_arch.model_cards"}


def _source_packages() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    return found


def test_every_source_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"pyproject.toml [tool.setuptools].packages lacks {missing}: a wheel would not ship them"
    assert "hf_arch.kernels.krr" in listed  # the check sees nested kernel packages
    for package, folder in setuptools["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), f"package-dir maps {package} to {folder}, which is no package"
