"""The command-line contract: real commands on real files; exit 0 / 2 / 1, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mridc.shared.zoo import default_shared_data_dir

IMAGE = default_shared_data_dir() / "photos" / "eval" / "coffee.png"


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", *args], check=False, capture_output=True, text=True, timeout=180)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "coffee.mrd"
    proc = run("mridc.edge.cli", "encode", str(IMAGE), "-o", str(out), "--bpp", "0.02", "--scale", "1", "--json",
               check_rc=0)
    summary = json.loads(proc.stdout)
    assert summary["bpp"] <= 0.02 and summary["bytes"] == out.stat().st_size
    return out


@pytest.mark.parametrize("module", ["mridc.edge.cli", "mridc.cloud.cli", "mridc.firmware_sim.cli", "mridc.bench.cli"])
def test_every_tool_explains_itself(module):
    proc = run(module, "--help", check_rc=0)
    assert "usage:" in proc.stdout and len(proc.stdout.splitlines()) > 5


def test_encode_inspect_decode(stream, tmp_path):
    info = json.loads(run("mridc.cloud.cli", "inspect", str(stream), "--json", check_rc=0).stdout)
    assert info["width"] == 600 and info["height"] == 400 and info["total_bytes"] == stream.stat().st_size
    out = tmp_path / "coffee.png"
    summary = json.loads(run("mridc.cloud.cli", "decode", str(stream), "-o", str(out), "--realism", "0",
                             "--json", check_rc=0).stdout)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (600, 400)
    assert summary["kept_tokens"] < summary["tokens"]  # full-resolution grid: MLM masked some tokens


def test_default_auto_scale_stays_in_budget_and_decodes_full_size(tmp_path):
    out = tmp_path / "auto.mrd"
    summary = json.loads(run("mridc.edge.cli", "encode", str(IMAGE), "-o", str(out), "--bpp", "0.015", "--json",
                             check_rc=0).stdout)
    assert summary["bpp"] <= 0.015
    info = json.loads(run("mridc.cloud.cli", "inspect", str(out), "--json", check_rc=0).stdout)
    assert info["grid_w"] < 38  # scaled: fewer tokens than the 38 columns of a full-resolution grid
    run("mridc.cloud.cli", "decode", str(out), "-o", str(tmp_path / "auto.png"), "--realism", "0", check_rc=0)
    from PIL import Image

    with Image.open(tmp_path / "auto.png") as im:
        assert im.size == (600, 400)


def _damaged(stream: Path, tmp_path: Path) -> dict[str, Path]:
    data = stream.read_bytes()
    cases = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "bitflip": data[:40] + bytes([data[40] ^ 0x10]) + data[41:],
        "forged_size": data[:3] + b"\xff\xff\xff\xff\x0f" + data[3:],
        "garbage": bytes(range(256)) * 3,
        "wrong_magic": b"XX" + data[2:],
    }
    paths = {}
    for name, payload in cases.items():
        p = tmp_path / f"{name}.mrd"
        p.write_bytes(payload)
        paths[name] = p
    return paths


def test_bad_streams_exit_2_with_one_line_and_no_traceback(stream, tmp_path):
    for name, path in _damaged(stream, tmp_path).items():
        for cmd in (["inspect", str(path)], ["decode", str(path), "-o", str(tmp_path / "x.png"), "--realism", "0"]):
            proc = run("mridc.cloud.cli", *cmd)
            assert proc.returncode == 2, (name, cmd, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr, (name, proc.stderr)
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments_exit_2(tmp_path, stream):
    cases = [
        ("mridc.edge.cli", "encode", str(tmp_path / "missing.png"), "-o", str(tmp_path / "a.mrd")),
        ("mridc.edge.cli", "encode", str(stream), "-o", str(tmp_path / "a.mrd")),  # not an image
        ("mridc.edge.cli", "encode", str(IMAGE), "-o", str(tmp_path / "a.mrd"), "--keep-ratio", "1.5"),
        ("mridc.edge.cli", "encode", str(IMAGE), "-o", str(tmp_path / "a.mrd"), "--bpp", "0.0001"),
        ("mridc.cloud.cli", "decode", str(stream), "-o", str(tmp_path / "a.png"), "--realism", "2"),
        ("mridc.cloud.cli", "inspect", str(tmp_path)),
    ]
    for args in cases:
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.strip(), args


def test_a_sliced_file_decodes_whole_and_with_slices_lost(tmp_path):
    out = tmp_path / "coffee.mrds"
    summary = json.loads(run("mridc.edge.cli", "encode", str(IMAGE), "-o", str(out), "--bpp", "0.02", "--scale", "1",
                             "--slice-bytes", "200", "--json", check_rc=0).stdout)
    sliced = summary["sliced"]
    assert sliced["slices"] >= 3 and max(sliced["slice_bytes"]) <= 200
    assert sliced["bytes_sliced"] > sliced["bytes_whole"] == summary["bytes"]
    whole = json.loads(run("mridc.cloud.cli", "decode", str(out), "-o", str(tmp_path / "a.png"), "--realism", "0",
                           "--json", check_rc=0).stdout)
    assert whole["sliced"]["rows_missing"] == 0 and whole["sliced"]["used"] == sliced["slices"]
    lossy = json.loads(run("mridc.cloud.cli", "decode", str(out), "-o", str(tmp_path / "b.png"), "--realism", "0",
                           "--drop-slices", "1", "--json", check_rc=0).stdout)
    assert lossy["sliced"]["rows_missing"] > 0 and lossy["kept_tokens"] < whole["kept_tokens"]
    from PIL import Image

    with Image.open(tmp_path / "b.png") as im:
        assert im.size == (600, 400)  # a frame, not a lost frame
    bad = run("mridc.edge.cli", "encode", str(IMAGE), "-o", str(tmp_path / "x"), "--slice-bytes", "10", check_rc=2)
    assert "--slice-bytes" in bad.stderr and "Traceback" not in bad.stderr
    plain = run("mridc.cloud.cli", "decode", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png"), check_rc=2)
    assert "Traceback" not in plain.stderr
