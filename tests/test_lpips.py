"""Standard LPIPS (AlexNet, VGG16; v0.1 heads) and DISTS in plain torch, against the authors' reference values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mridc.lab.lpips import ALEX_FILE, DISTS_FILE, VGG_FILE, StandardPerceptual, default_weights_dir

WEIGHTS = default_weights_dir()
CHECK = WEIGHTS / "check"
_PRESENT = all((WEIGHTS / f).is_file() for f in (ALEX_FILE, VGG_FILE, DISTS_FILE)) and CHECK.is_dir()
needs_weights = pytest.mark.skipif(not _PRESENT, reason=f"LPIPS/DISTS weight files not found in {WEIGHTS} "
                                                        "(shared data folder, or $MRIDC_LPIPS_DISTS_WEIGHTS)")


def _png(name: str) -> np.ndarray:
    return np.asarray(Image.open(CHECK / name).convert("RGB"))


@pytest.fixture(scope="module")
def sp():
    return StandardPerceptual.load("cpu")


@needs_weights
def test_lpips_alex_matches_the_reference_values(sp):
    ref, p0, p1 = _png("ex_ref.png"), _png("ex_p0.png"), _png("ex_p1.png")
    assert sp.lpips_alex(ref, p0) == pytest.approx(0.7219, abs=5e-4)
    assert sp.lpips_alex(ref, p1) == pytest.approx(0.1376, abs=5e-4)
    assert sp.lpips_alex(ref, ref) == pytest.approx(0.0, abs=1e-7)


@needs_weights
def test_dists_matches_the_authors_value(sp):
    assert sp.dists(_png("r0.png"), _png("r1.png")) == pytest.approx(0.3347, abs=5e-4)


@needs_weights
def test_identity_symmetry_and_more_distortion_is_farther(sp):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img = np.clip(np.stack([base, base[::-1], base[:, ::-1]], 2) + rng.normal(0, 4, (96, 128, 3)), 0, 255)
    img = img.astype(np.uint8)
    noise = rng.normal(0, 1, img.shape)
    mild = np.clip(img + 8 * noise, 0, 255).astype(np.uint8)
    strong = np.clip(img + 40 * noise, 0, 255).astype(np.uint8)
    for metric in ("lpips_alex", "lpips_vgg", "dists"):
        assert sp.distance(metric, img, img) == pytest.approx(0.0, abs=1e-6), metric
        d_mild = sp.distance(metric, img, mild)
        assert d_mild == pytest.approx(sp.distance(metric, mild, img), rel=1e-5, abs=1e-7), metric
        assert 0 < d_mild < sp.distance(metric, img, strong), metric
    # the cached reference features give the same value as a fresh computation
    fresh = StandardPerceptual.load("cpu", metrics=("lpips_vgg",))
    assert fresh.lpips_vgg(img, strong) == pytest.approx(sp.lpips_vgg(img, strong), rel=1e-6)


def test_meter_and_lpips_agree_on_the_record_keys():
    from mridc.lab import lpips, meter

    assert meter.STANDARD_PERCEPTUAL == lpips.METRICS and set(lpips.LABELS) == set(lpips.METRICS)
    assert set(meter.STANDARD_PERCEPTUAL) <= set(meter.ALL_METRICS)


def test_missing_weights_are_reported_not_raised(tmp_path):
    sp = StandardPerceptual.load("cpu", tmp_path)
    assert sp.available == ()
    assert set(sp.missing) == {"lpips_alex", "lpips_vgg", "dists"}
    assert "not found" in sp.missing["dists"]
    img = np.zeros((32, 32, 3), np.uint8)
    assert sp.lpips_alex(img, img) is None and sp.dists(img, img) is None


def test_meter_reports_unavailable_with_the_reason(tmp_path, monkeypatch):
    from mridc.lab.meter import Meter

    monkeypatch.setenv("MRIDC_LPIPS_DISTS_WEIGHTS", str(tmp_path))
    meter = Meter(("psnr", "lpips_alex", "dists"))
    img = np.full((40, 40, 3), 100, np.uint8)
    out = meter.measure(img, img)
    assert out["lpips_alex"] is None and out["dists"] is None and "lpips_vgg" not in out
    labels = meter.standard_labels()
    assert labels["dists"].startswith("unavailable (") and str(tmp_path) in labels["dists"]


@needs_weights
def test_rd_records_carry_the_standard_distances(tmp_path):
    from mridc.bench import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    y, x = np.mgrid[0:96, 0:112]
    img = 128 + 60 * np.sin(x / 6.0) * np.cos(y / 9.0)
    Image.fromarray(np.stack([img, img[::-1], img[:, ::-1]], 2).astype(np.uint8)).save(folder / "a.png")
    out = tmp_path / "out"
    assert cli.main(["rd", "--images", str(folder), "--bpp", "0.5", "--codecs", "jpeg",
                     "--metrics", "psnr,lpips_alex,lpips_vgg,dists", "--out", str(out), "--crop-bpp", ""]) == 0
    doc = json.loads((out / "rd.json").read_text())
    rec = next(r for r in doc["records"] if r["status"] == "ok")
    for key in ("lpips_alex", "lpips_vgg", "dists"):
        assert isinstance(rec[key], float) and rec[key] > 0, key
        assert doc["summary"][0][key] == pytest.approx(rec[key])
    assert doc["meta"]["standard_perceptual"]["dists"] == "DISTS"
    assert "DISTS uses the same VGG16" in doc["meta"]["network_note"]
    md = (out / "summary.md").read_text()
    assert "LPIPS-Alex v0.1 (lower is better)" in md and "DISTS (lower is better)" in md
    assert "<th>DISTS</th>" in (out / "report.html").read_text()
