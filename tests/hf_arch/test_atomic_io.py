"""The one atomic writer: a reader (or an interrupted run) sees the old file / directory or the new one, never half,
and a failure leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from hf_arch.atomic_io import atomic_output_dir, atomic_write_text, replace_dir


def test_write_text_replaces_keeps_mode_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "one\n")
    os.chmod(path, 0o640)
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n" and (path.stat().st_mode & 0o777) == 0o640
    with pytest.raises(TypeError):
        atomic_write_text(path, b"not text")  # fails mid-write
    assert path.read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_output_dir_refuses_to_overwrite_unless_asked_and_cleans_up_after_a_failure(tmp_path):
    out = tmp_path / "converted"
    with atomic_output_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    assert (out / "model.safetensors").read_text() == "v1"
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "model.safetensors").read_text() == "v1"  # the old output survives a failed overwrite
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("v2")
    assert (out / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_replace_dir_swaps_a_finished_directory_in(tmp_path):
    final, new = tmp_path / "final", tmp_path / "partial"
    final.mkdir(), new.mkdir()
    (final / "a").write_text("old")
    (new / "a").write_text("new")
    replace_dir(new, final)
    assert (final / "a").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
