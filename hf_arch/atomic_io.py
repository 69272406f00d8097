"""Writes that readers never see half done: one file, or one directory, replaced in a single rename.

Every writer in the package goes through here (conversion outputs, remote-code files, training outputs, benchmark
results): an interrupted run leaves the old version or the new one, never a mix, and nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output_dir", "atomic_write_text", "replace_dir"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` newlines) through a temporary sibling, flushed to disk, then renamed over
    ``path``; a replaced file keeps its permissions, a new one gets the umask's."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``new`` to ``target`` (same filesystem), replacing what is there: the old one is
    moved aside first and removed only once the new one is in place."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on any failure it is removed.
    An existing ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"Output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:  # KeyboardInterrupt included: an interrupted run leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
