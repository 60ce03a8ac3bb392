"""`mridc-bench ablation` on one tiny image at one rate: the JSON has its structure and its numbers are finite."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mridc.lab.datasets import data_root
from mridc.shared.zoo import default_models_dir


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} in the JSON")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_checkerboard_order_is_a_checkerboard_at_half():
    from mridc.bench.ablation_mlm import checkerboard_priority, masked_view
    from mridc.edge import mlm

    keep = mlm.select_keep_mask(checkerboard_priority((6, 8)), 24, None, mlm.MaskingConfig(anchor_spacing=0))[0]
    ys, xs = np.mgrid[0:6, 0:8]
    assert np.array_equal(keep, (ys + xs) % 2 == 0)
    view = masked_view(np.full((90, 120, 3), 7, np.uint8), keep, 16)
    assert view.shape == (90, 120, 3) and view[0, 0, 0] == 7 and view[0, 16, 0] == 128


def test_ablation_tiny_run(tmp_path):
    photo = data_root() / "photos" / "eval" / "astronaut.png"
    if not photo.exists() or not (default_models_dir() / "predictor.pt").exists():
        pytest.skip("needs ../shared/data and the shipped models")
    from PIL import Image

    from mridc.bench.cli import main

    small = tmp_path / "img" / "astronaut.png"
    small.parent.mkdir()
    Image.open(photo).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS).save(small)
    out = tmp_path / "out"
    code = main(["ablation", "--images", str(small), "--mlm-bpp", "0.04", "--bpcg-bpp", "0.04", "--curve-bpp", "0.04",
                 "--curve", "0,1", "--keep-ratios", "0.5", "--timing-repeats", "0", "--no-figures", "--threads", "2",
                 "--out", str(out)])
    assert code == 0
    result = json.loads((out / "ablation.json").read_text(), parse_constant=_reject_constant)
    assert all(math.isfinite(v) for v in _numbers(result))
    assert {"meta", "mlm", "bpcg"} <= set(result)
    assert result["meta"]["images"][0]["size"] == [128, 128]

    mlm = result["mlm"]
    assert {r["method"] for r in mlm["records"]} == {"map", "map-no-anchors", "random", "checkerboard"}
    for r in mlm["records"]:
        assert r["status"] == "ok"
        assert r["bytes"] <= r["target_bytes"]  # equal bits: every policy within the same budget
        assert r["psnr"] > 5 and 0 < r["ms_ssim"] <= 1 and r["perceptual"] >= 0
    assert len(mlm["wins"]) == 3 and mlm["summary"]

    bpcg = result["bpcg"]
    (acc,) = [r for r in bpcg["token_accuracy"]["summary"] if r["mask"] == "random"]
    assert acc["masked_tokens"] > 0
    for key in ("predictor_top1", "predictor_top5", "nearest_top1", "mode_top1"):
        assert 0 <= acc[key] <= 1
    assert acc["predictor_top1"] <= acc["predictor_top5"]
    variants = {r["variant"] for r in bpcg["equal_bits"]["records"]}
    assert {"nearest-r0", "bpcg-r0", "maskgit-r0", "bpcg-r1"} <= variants
    for r in bpcg["equal_bits"]["records"]:
        assert r["status"] == "ok" and r["bytes"] <= r["target_bytes"] and r["psnr"] > 5
    assert bpcg["timing"] is None
    summary = (out / "summary.md").read_text()
    assert "## MLM" in summary and "## BPCG" in summary and "| 0.04 |" in summary
