"""`mridc-bench compare` joins two rd runs image by image."""

from __future__ import annotations

import json

from mridc.bench.compare import compare, to_markdown


def _rd(path, records):
    path.write_text(json.dumps({"records": records}))
    return str(path)


def _rec(image, codec, bpp, psnr, status="ok"):
    return {"image": image, "codec": codec, "target_bpp": bpp, "bpp": bpp * 0.98, "psnr": psnr, "ms_ssim": 0.5,
            "perceptual": 1.0, "niqe": 5.0, "status": status}


def test_only_common_images_count_and_best_classical_is_marked(tmp_path):
    ours = _rd(tmp_path / "a.json", [_rec("x", "mridc-r0", 0.02, 20.0), _rec("y", "mridc-r0", 0.02, 22.0),
                                     _rec("z", "mridc-r0", 0.02, 99.0)])
    theirs = _rd(tmp_path / "b.json", [_rec("x", "avif", 0.02, 24.0), _rec("y", "avif", 0.02, 26.0),
                                       _rec("x", "jpeg", 0.02, 18.0), _rec("y", "jpeg", 0.02, 0.0, status="over")])
    result = compare(ours, theirs, [0.02])
    assert result["images"] == ["x", "y"]
    row = result["table"]["0.02"]
    assert row["mridc-r0"]["psnr"] == (21.0, 2)
    assert row["avif"]["psnr"] == (25.0, 2)
    assert row["jpeg"]["psnr"] == (18.0, 1)  # the over-budget record does not count
    md = to_markdown(result)
    assert "| avif | 25.000 **best classical**" in md and "18.000 (1)" in md


def test_standard_distances_are_tabled_when_present_and_old_files_still_load(tmp_path):
    old = _rd(tmp_path / "old.json", [_rec("x", "avif", 0.02, 24.0)])  # an rd run from before LPIPS/DISTS
    new = _rd(tmp_path / "new.json", [{**_rec("x", "mridc-r0", 0.02, 20.0), "lpips_alex": 0.3, "lpips_vgg": 0.4,
                                       "dists": 0.2}])
    md_old = to_markdown(compare(old, old, [0.02]))
    assert "LPIPS-Alex" not in md_old and "DISTS" not in md_old
    result = compare(new, old, [0.02])
    assert result["table"]["0.02"]["mridc-r0"]["dists"] == (0.2, 1)
    md = to_markdown(result)
    assert "| LPIPS-Alex | LPIPS-VGG | DISTS |" in md and "0.200" in md
    assert "DISTS uses the same VGG16" in md
