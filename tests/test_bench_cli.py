"""The mridc-bench entry point: registry and a tiny real rd run."""

import json

import numpy as np
import pytest
from PIL import Image

from mridc.bench import cli


def test_register_adds_a_subcommand(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", {})
    seen = {}

    def add(p):
        p.add_argument("--x", type=int, default=1)

    def run(args):
        seen["x"] = args.x
        return 0

    cli.register(cli.Subcommand("probe", "test probe", add, run))
    with pytest.raises(ValueError):
        cli.register(cli.Subcommand("probe", "again", add, run))
    assert cli.main(["probe", "--x", "7"]) == 0 and seen == {"x": 7}
    assert "rd" in cli.subcommands()


def test_rd_end_to_end_on_tiny_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        y, x = np.mgrid[0:200, 0:208]
        img = 128 + 60 * np.sin(x / (6.0 + i)) * np.cos(y / 9.0)
        img = np.clip(np.stack([img, img[::-1], img[:, ::-1]], 2)
                      + rng.normal(0, 6, (200, 208, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
    (folder / "rois.json").write_text(json.dumps({"im0.png": [[20, 20, 100, 100]]}))
    out = tmp_path / "out"
    rc = cli.main(["rd", "--images", str(folder), "--bpp", "0.05,0.2", "--codecs", "jpeg,webp",
                   "--metrics", "psnr,ms_ssim,niqe,roi", "--out", str(out), "--crop-size", "64",
                   "--crop-bpp", "0.2"])
    assert rc == 0
    doc = json.loads((out / "rd.json").read_text())
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    assert ok and all(r["bits"] <= r["budget_bits"] for r in ok if r["codec"] in ("jpeg", "webp"))
    assert all(r["target_bpp"] in (0.05, 0.2) for r in doc["records"])
    assert any(r.get("roi_psnr") is not None for r in ok)
    assert {r["codec"] for r in doc["summary"]} >= {"jpeg", "webp"}
    assert (out / "plots" / "all_psnr.png").is_file()
    report = (out / "report.html").read_text()
    assert "<img" in report and "crops/" in report
    for crop in doc["crops"]:
        assert (out / crop["path"]).is_file()
    (out / "summary.md").unlink()
    assert cli.main(["rd", "--out", str(out), "--replot"]) == 0
    assert "| target bpp | jpeg | webp |" in (out / "summary.md").read_text()


def test_mridc_adapter_counts_real_bytes_and_flags_overshoot():
    from types import SimpleNamespace

    from mridc.bench.rd import MRIDCCodec
    from mridc.lab.codecs import Codec

    class FakeEncoder:
        def encode(self, image, bpp, scale=None):
            nbytes = int(bpp * image.shape[0] * image.shape[1] / 8) + 3  # overshoots by 3 bytes
            return SimpleNamespace(bitstream=b"\x01" * nbytes, bpp=bpp, timings={"total": 0.0})

    class FakeDecoder:
        def decode(self, data, realism=0.0, seed=0):
            return np.full((32, 48, 3), 7, np.uint8)

    codec = MRIDCCodec(FakeEncoder(), FakeDecoder(), realism=0.5)
    assert isinstance(codec, Codec) and codec.name == "mridc-r0.5"
    payload, decoded, info = codec.encode(np.zeros((32, 48, 3), np.uint8), 80)
    assert info["bits"] == len(payload) * 8 == 104 and info["over_budget"]
    assert info["bpp"] == 104 / (32 * 48) and decoded.shape == (32, 48, 3)


def test_mridc_is_skipped_with_a_reason_when_not_importable(monkeypatch):
    import builtins

    from mridc.bench.rd import mridc_codecs

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "mridc.cloud.pipeline":
            raise ImportError("not shipped")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    found, reason = mridc_codecs([0.0], None, 0)
    assert found == [] and "mridc skipped" in reason


def test_refine_bench_tiny_run(tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    monkeypatch.setenv("MRIDC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((128, 192, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    rc = cli.main(["refine", "--out", str(out), "--images", str(folder), "--size", "192x128", "--bpp", "0.2",
                   "--limit", "1",
                   "--configs", "preview-torch,refined-torch,refined-fast", "--repeats", "1", "--timed-frames", "1"])
    assert rc == 0
    doc = json.loads((out / "refine.json").read_text())
    assert list(doc["summary"]) == ["preview-torch", "refined-torch", "refined-fast"]
    assert len(doc["rows"]) == 3 and all(r["seconds"] > 0 and r["psnr"] > 5 for r in doc["rows"])
    assert "New refined decode (refined-fast) against the old one" in (out / "summary.md").read_text()
    assert (out / "refine.png").is_file()
    assert cli.main(["refine", "--out", str(out), "--configs", "nope"]) == 2


@pytest.mark.net
def test_loss_bench_tiny_run(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    y, x = np.mgrid[0:256, 0:384]
    img = (128 + 80 * np.sin(x / 9.0) * np.cos(y / 11.0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(np.stack([img, img[::-1], img[:, ::-1]], 2)).save(folder / "a.png")
    out = tmp_path / "out"
    rc = cli.main(["loss", "--out", str(out), "--images", str(folder), "--size", "384x256", "--bpp", "0.05",
                   "--packet-bytes", "160", "--losses", "0,0.4", "--retransmit", "0,4", "--trials", "1",
                   "--deadline", "1"])
    assert rc == 0
    doc = json.loads((out / "loss.json").read_text())
    by = {(s["retransmit"], s["loss"], s["variant"]): s for s in doc["summary"]}
    variants = ("mridc-sliced", "mridc-whole", "avif-whole", "mridc-coap")
    for variant in variants:
        assert by[(0, 0.0, variant)]["decoded_fraction"] == 1.0  # a clean link delivers everything
    # The product path: with its resend protocol every slice arrives; the stored picture's latency is measured.
    coap = [r for r in doc["rows"] if r["variant"] == "mridc-coap" and r["retransmit"] == 4]
    assert coap and all(r["decoded"] and r["received"] == r["packets"] for r in coap)
    assert all(0 < r["latency_first_s"] <= r["latency_final_s"] < 60 for r in coap)
    lossy = [r for r in doc["rows"] if r["loss"] == 0.4 and r["retransmit"] == 4]
    assert sum(r["sends"] for r in lossy) > sum(r["packets"] for r in lossy)  # losses were resent
    sizes = doc["config"]["bytes"]["imgs/a"]
    assert sizes["sliced"] <= sizes["whole"] and sizes["slices"] >= 2
    assert (out / "loss.png").is_file() and "frames decoded" in (out / "summary.md").read_text()


def test_sequence_bench_tiny_run(tmp_path):
    """Two vtest eval frames at one budget: MRIDC intra and inter, AVIF, and x264 when ffmpeg has it."""
    import json

    from mridc.lab.video import video_availability

    out = tmp_path / "out"
    codecs = "avif" + ("" if video_availability("x264") else ",x264")
    rc = cli.main(["sequence", "--out", str(out), "--intervals", "1", "--bpp", "0.02", "--max-frames", "2",
                   "--codecs", codecs, "--threads", "1"])
    assert rc == 0
    doc = json.loads((out / "sequence.json").read_text())
    variants = {r["variant"] for r in doc["rows"]}
    assert {"mridc-intra", "mridc-inter"} <= variants and set(codecs.split(",")) <= variants
    inter = next(r for r in doc["rows"] if r["variant"] == "mridc-inter")
    assert inter["kinds"] == ["intra", "inter"] and all(r["psnr"] > 10 for r in doc["rows"])
    assert (out / "sequence.png").is_file() and "MRIDC inter against MRIDC intra" in (out / "summary.md").read_text()


def test_adapt_bench_tiny_run(tmp_path):
    """A synthetic fixed scene, a few steps of adaptation: every table, curve and cost is written, and the adapted
    decoder is scored beside the base and the classical codec at the same bytes."""
    from test_adaptation import scene_frame

    scene = tmp_path / "scene"
    scene.mkdir()
    for i in range(8):
        Image.fromarray(scene_frame(i)).save(scene / f"{i:03d}.png")
    out = tmp_path / "out"
    rc = cli.main(["adapt", "--out", str(out), "--scene", str(scene), "--calib-range", "0.0:0.5",
                   "--eval-range", "0.75:", "--calib-frames", "3", "--eval-frames", "1", "--bpp", "0.03",
                   "--minutes", "0.05", "--checkpoints", "", "--frame-counts", "2", "--count-minutes", "0.02",
                   "--codecs", "jpeg", "--threads", "1"])
    assert rc == 0
    doc = json.loads((out / "adapt.json").read_text())
    row = doc["summary"][0]
    assert {"base-r0", "adapted-r0", "jpeg", "classical-best"} <= set(row["variants"])
    assert doc["adaptation"]["adapter_bytes"] > 0 and doc["link_cost"]["calibration_bytes"] > 0
    assert [c["frames"] for c in doc["frames_curve"]] == [2] and doc["minutes_curve"]
    assert (out / "adapt.png").is_file() and "Scene adaptation" in (out / "summary.md").read_text()
