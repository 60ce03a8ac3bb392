"""`mridc-bench edge` on a tiny frame: JSON structure, finite numbers, plots (timings themselves are not tested)."""

import json
import math

import numpy as np
from PIL import Image

from mridc.bench import cli, edge_bench
from mridc.bench.all import _filter_known


def _image_folder(tmp_path, size=(96, 64)):
    folder = tmp_path / "imgs"
    folder.mkdir()
    y, x = np.mgrid[0:size[1], 0:size[0]]
    img = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img = np.clip(np.stack([img, img[::-1], img[:, ::-1]], 2), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / "a.png")
    return folder


def test_cover_crop_gives_the_frame_size():
    img = np.zeros((300, 451, 3), np.uint8)
    assert edge_bench.cover_crop(img).shape == (512, 768, 3)
    assert edge_bench.cover_crop(img, 64, 48).shape == (48, 64, 3)


def test_all_passes_only_options_a_subcommand_knows():
    kept, dropped = _filter_known(["--limit", "2", "--bogus", "1", "2", "--crop-bpp", "", "--flag"],
                                  {"--limit", "--crop-bpp", "--flag"})
    assert kept == ["--limit", "2", "--crop-bpp", "", "--flag"] and dropped == ["--bogus", "1", "2"]


def test_edge_bench_tiny_run(tmp_path):
    folder = _image_folder(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["edge", "--out", str(out), "--images", str(folder), "--frames", "1", "--size", "128x96",
                   "--bpp", "0.1",
                   "--repeats", "1", "--warmup", "0", "--backends", "onnx,litert",
                   "--eval-images", str(folder), "--quality-codecs", "jpeg"])
    assert rc == 0
    doc = json.loads((out / "edge.json").read_text())
    by = {b["backend"]: b for b in doc["backends"]}
    assert by["onnx"]["status"] == "ok" and by["litert"]["status"] in ("ok", "skipped")
    for b in (by["onnx"],):
        assert {"encoder", "map", "select_and_code", "total"} <= set(b["median_ms"])
        assert all(math.isfinite(v) and v > 0 for v in b["median_ms"].values())
        assert b["peak_rss_mib"] > 10 and math.isfinite(b["load_1min_before"])
    inter = by["onnx"]["interleaved"]
    assert {"mridc", "jpeg", "webp", "avif"} <= set(inter["median_ms"]) and inter["ratio_mridc_over"]["avif"] > 0
    assert "skipped" in doc["token_agreement"]  # no torch run here: no reference
    rows = {s["codec"]: s for s in doc["tokenizer_quality"]["summary"]}
    assert rows["mridc-full"]["n_fit"] == 1 and math.isfinite(rows["mridc-full"]["psnr"])
    assert doc["model_files"]["onnx"]["bytes"] > 0
    assert (out / "edge_latency.png").is_file() and (out / "summary.md").is_file()


def test_token_agreement_counts_equal_tokens(tmp_path):
    ref = {"e0": np.arange(12, dtype=np.uint16).reshape(3, 4), "e1": np.zeros((2, 2), np.uint16)}
    got = {"e0": ref["e0"].copy(), "e1": np.array([[0, 1], [0, 0]], np.uint16)}
    got["e0"][0, 0] = 99
    np.savez(tmp_path / "tokens_torch.npz", **ref)
    np.savez(tmp_path / "tokens_onnx.npz", **got)
    out = edge_bench.token_agreement(tmp_path, ["onnx", "litert", "torch"], ["a", "b"])
    assert out["backends"]["onnx"]["agreement"] == round(14 / 16, 5)
    assert out["backends"]["onnx"]["per_image"] == {"a": 11 / 12, "b": 0.75}
    assert set(out["backends"]) == {"onnx"}
