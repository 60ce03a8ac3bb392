"""`mridc-bench link` on a tiny frame over a fast emulated link: JSON structure and finite numbers."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mridc.bench import cli


def _image_folder(tmp_path, size):
    folder = tmp_path / "imgs"
    folder.mkdir()
    y, x = np.mgrid[0:size[1], 0:size[0]]
    img = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    Image.fromarray(np.clip(np.stack([img, img[::-1], img[:, ::-1]], 2), 0, 255).astype(np.uint8)).save(
        folder / "a.png")
    return folder


@pytest.mark.net
def test_link_bench_tiny_run(tmp_path):
    from mridc.lab.broker import BrokerError, find_mosquitto

    try:
        find_mosquitto()
    except BrokerError:
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")
    folder = _image_folder(tmp_path, (128, 96))
    out = tmp_path / "out"
    rc = cli.main(["link", "--out", str(out), "--image", str(folder), "--size", "128x96", "--bpp", "0.1",
                   "--realism", "0.2", "--links", "2000000", "--latency-ms", "20", "--codecs", "jpeg",
                   "--repeats", "1", "--burst", "2", "--burst-min-seconds", "0", "--max-bpp", "0.5",
                   "--match-steps", "3", "--match-bisect", "0"])
    assert rc == 0
    doc = json.loads((out / "link.json").read_text())
    assert [f["codec"] for f in doc["files"]] == ["mridc", "jpeg"]
    assert doc["files"][1]["match"] in ("perceptual", "same_bytes")
    (link,) = doc["links"]
    assert [r["codec"] for r in link["rows"]] == ["mridc", "jpeg"]
    for r in link["rows"]:
        for key in ("encode_s", "link_s", "decode_s", "total_s", "fpm_link", "fpm", "fpm_ideal"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["total_s"] >= r["link_s"] and r["wire_bytes"] > r["bytes"]
        assert r["link_s"] < r["first_picture_s"] <= r["total_s"]
    mridc_row = link["rows"][0]
    assert mridc_row["preview_decode_s"] > 0 and mridc_row["first_picture_s"] < mridc_row["total_s"]
    assert link["rows"][1]["first_picture_s"] == link["rows"][1]["total_s"]  # a classical codec: one picture
    assert (out / "link.png").is_file() and (out / "summary.md").is_file()
