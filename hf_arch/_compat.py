"""Import-time guards: the transformers range we support, and the ``hf_arch.kernels`` namespace sub-package."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

# The range CI tests: the floor in its own venv, the newest 5.x on every run. A release outside it fails loudly here
# instead of silently changing results (5.25 renamed the cache argument; 6.0 drops the old name).
TRANSFORMERS_FLOOR = (5, 17)
TRANSFORMERS_TESTED_MAJOR = 5


class UnsupportedTransformersVersion(ImportError):
    pass


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 5.26.0.dev0, 5.26.0rc1: keep the release numbers only
            break
    return tuple(parts)


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``UnsupportedTransformersVersion`` naming the installed and supported versions when they differ."""
    if version is None:
        import transformers

        version = transformers.__version__
    release = _release(version)
    supported = f">={'.'.join(map(str, TRANSFORMERS_FLOOR))},<{TRANSFORMERS_TESTED_MAJOR + 1}"
    if release[:2] < TRANSFORMERS_FLOOR or release[0] > TRANSFORMERS_TESTED_MAJOR:
        raise UnsupportedTransformersVersion(
            f"hf-arch supports transformers {supported}; transformers {version} is installed. "
            f"Install a supported release: pip install 'transformers{supported}'"
        )


def ensure_kernels_subpackage() -> None:
    """Make ``hf_arch.kernels`` importable from the repo's ``kernels/`` folder.

    ``kernels/`` has no ``__init__.py`` on purpose: from the repo root a regular package of that name would shadow the
    Hub ``kernels`` library transformers imports; a namespace folder always loses to it. A wheel installs the folder
    as ``hf_arch/kernels`` and Python finds it there; setuptools' editable finder maps it but cannot resolve a
    namespace sub-package, so give it the spec ourselves in that one case.
    """
    name = f"{__package__}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parents[1] / "kernels"
    if not (folder / "ops.py").is_file():
        raise ImportError(f"{name} not found (looked in the installed package and in {folder})")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules[name] = importlib.util.module_from_spec(spec)
