"""`hf-arch bench routers` on a tiny budget: each named router trains on the same tokens and gets a row; unknown
routers and an existing result are refused by name."""

from __future__ import annotations

import json

import pytest


def test_routers_train_side_by_side(tmp_path, assets, monkeypatch):
    from hf_arch.recipes.router_comparison import main

    monkeypatch.setenv("HF_ARCH_ASSETS", str(assets))
    assert main(["--out", str(tmp_path), "--routers", "sinkhorn", "pre_gated", "--steps", "2"]) == 0
    result = json.loads((tmp_path / "routers.json").read_text())
    assert [r["router"] for r in result["rows"]] == ["sinkhorn", "pre_gated"]
    assert all(r["val_loss"] > 0 and r["experts_per_token"] == 2.0 for r in result["rows"])
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["--out", str(tmp_path), "--routers", "sinkhorn", "--steps", "2"])
    with pytest.raises(ValueError, match="unknown router 'top3'"):
        main(["--out", str(tmp_path / "x"), "--routers", "top3", "--steps", "2"])
