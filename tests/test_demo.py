"""``make demo`` in short: the real demo command end to end in a subprocess (broker, cloud service with the
shipped decoder, emulated links, three cameras), then its report; plus Ctrl-C and output-folder safety.

The short run (1 photo + 2 clip frames, realism 0) takes about a minute on two shared cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET_BPP = 0.02


def _lpips_weights_present() -> bool:
    from mridc.lab.lpips import ALEX_FILE, default_weights_dir

    return (default_weights_dir() / ALEX_FILE).is_file()


def _perceptual_weights_present() -> bool:
    from mridc.lab.perceptual import default_weights_path

    return default_weights_path().is_file()


def _mosquitto_present() -> bool:
    from mridc.lab.broker import BrokerError, find_mosquitto

    try:
        find_mosquitto()
    except BrokerError:
        return False
    return True


def _demo_command(out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "mridc.firmware_sim.demo", "--out", str(out), "--bpp", str(TARGET_BPP), *extra]
    if not _perceptual_weights_present():  # the MobileNetV2 weights are not in the repository
        command.append("--no-perceptual")
    return command


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is finished; only its parent (gone with the demo) would reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _assert_gone(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.2)
    assert not [role for role, pid in pids.items() if _alive(pid)], f"left running: {pids}"


@pytest.mark.net
def test_short_demo_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    started = time.monotonic()
    proc = subprocess.run(_demo_command(out, "--images", "1", "--frames", "2", "--realism", "0", "--fps", "0",
                                        "--timeout", "200"),
                          cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    # progress while running, and the summary at the end
    assert "acked 3/3" in proc.stdout
    assert "MRIDC Edge demo: 3 frames from 3 cameras" in proc.stdout
    assert "delivery: 3/3 stored, exactly once: True" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    if _mosquitto_present():
        assert report["setup"]["transport"].startswith("MQTT") and not report["setup"]["transport_fallback"]
    assert report["setup"]["realism"] == 0.0 and report["setup"]["link"]["profile"] == "nbiot"

    delivery = report["delivery"]
    assert delivery["accepted"] == delivery["stored"] == 3
    assert delivery["exactly_once"] is True
    assert delivery["missing_in_store"] == [] and delivery["unexpected_in_store"] == []
    assert delivery["rejected"] == 0 and delivery["queue_left"] == 0

    frames = report["frames"]
    assert sorted((f["device"], f["sequence"]) for f in frames) == [
        ("cam-photos", 1), ("cam-yard-a", 1), ("cam-yard-b", 1)]
    for f in frames:
        assert [a for a in f["acks"] if a in ("STORED", "DUPLICATE", "REJECTED")][:1] == ["STORED"], f["acks"]
        assert f["acks"].count("STORED") == 1
        assert f["bits"] == f["bytes"] * 8 == (out / f["bitstream"]).stat().st_size * 8
        assert 0 < f["bpp"] <= TARGET_BPP * 1.001, f["bpp"]
        assert f["cloud"]["bitstream_sha256_matches"] is True
        assert f["cloud"]["decode"]["realism"] == 0.0
        assert 0 < f["capture_to_stored_s"] < elapsed
        mridc = f["mridc"]
        assert isinstance(mridc["psnr"], float) and math.isfinite(mridc["psnr"]) and mridc["psnr"] > 8
        assert 0 < mridc["ms_ssim"] <= 1
        if _perceptual_weights_present():
            assert math.isfinite(mridc["perceptual"]) and mridc["perceptual"] >= 0
            if _lpips_weights_present():  # standard LPIPS-Alex beside it (lab/lpips.py)
                assert math.isfinite(mridc["lpips_alex"]) and mridc["lpips_alex"] > 0
        avif = f["avif"]
        assert avif["fits"] is True and avif["bytes"] <= f["bytes"], avif
        assert math.isfinite(avif["psnr"])
        for key in ("original", "reconstruction", "side_by_side", "bitstream"):
            assert (out / f[key]).is_file(), key
        assert (out / avif["png"]).is_file()

    summary = report["summary"]
    assert summary["frames"] == 3 and math.isfinite(summary["mridc"]["psnr"])
    assert summary["bytes_total"] == sum(f["bytes"] for f in frames)
    assert report["link"]["bytes_up"] > summary["bytes_total"]  # the bitstreams went through the links
    for name in ("report.md", "index.html", "logs/cloud.log", "logs/demo.log"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "cam-yard-a" in md and "AVIF" in md
    assert "side_by_side/cam-photos_000001.png" in (out / "index.html").read_text()

    _assert_gone(report["processes"])


@pytest.mark.net
def test_ctrl_c_stops_everything_it_started(tmp_path):
    out = tmp_path / "demo-out"
    proc = subprocess.Popen(_demo_command(out, "--images", "1", "--frames", "0", "--realism", "0", "--fps", "0"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: dict[str, int] = {}
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "mosquitto listening on" in line:
                pids["mosquitto"] = int(line.rsplit("(pid ", 1)[1].rstrip(")\n"))
            if "cloud     ready (pid" in line:
                pids["cloud"] = int(line.split("(pid ", 1)[1].split(")", 1)[0])
                break
            assert time.monotonic() < deadline, "".join(lines)
        assert "cloud" in pids, "".join(lines) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest + err
    assert "interrupted" in err
    _assert_gone(pids)


def test_refuses_an_output_folder_that_is_not_its_own(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    proc = subprocess.run([sys.executable, "-m", "mridc.firmware_sim.demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "not a demo output folder" in proc.stderr
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_help_names_the_options():
    proc = subprocess.run([sys.executable, "-m", "mridc.firmware_sim.demo", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    for option in ("--out", "--bpp", "--realism", "--transport", "--link-profile", "--frames", "--keep-running"):
        assert option in proc.stdout


def test_sample_assets_are_small_and_attributed():
    assets = REPO / "src" / "mridc" / "firmware_sim" / "demo_assets"
    clip = assets / "vtest_500-539.avi"
    assert clip.stat().st_size <= 3 * 1024 * 1024
    attribution = (assets / "ATTRIBUTION.txt").read_text()
    for name in ("vtest_500-539.avi", "chelsea.png", "coffee.png", "rocket.jpg", "opencv-doc 4.6.0"):
        assert name in attribution
    import cv2

    capture = cv2.VideoCapture(str(clip))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    assert frames == 40
