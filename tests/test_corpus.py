"""`mridc-cloud data`: the training corpus on tiny synthetic folders (provenance, duplicates, split, refusals)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mridc.cloud import corpus as C


def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth random 'photo' (distinct seeds give unrelated perceptual hashes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture
def shared(tmp_path) -> Path:
    """A miniature shared data folder: training photos with licence files, and evaluation photos."""
    root = tmp_path / "shared"
    train = root / "photos/train"
    train.mkdir(parents=True)
    for i in range(6):
        photo(i).save(train / f"p{i}_by_Someone.jpg", quality=95)
    (root / "photos/COPYRIGHT.lomiri-wallpapers.txt").write_text(
        "Files: 16.04/p0_by_Someone.jpg\nCopyright: Someone\nLicense: CC-BY-4.0\n\n"
        "Files: 16.04/p1_by_Someone.jpg\nCopyright: Someone\nLicense: CC0-1.0\n")
    extra = root / "photos/train_extra/gcompris"
    extra.mkdir(parents=True)
    photo(10).save(extra / "erase__alpaca.webp", quality=90)
    (extra / "erase__CREDITS__README").write_text(
        "Copyright: A. Photographer\nSource: somewhere\nLicense: CC-BY-SA-4.0\nFiles: alpaca.webp\n")
    ev = root / "photos/eval"
    ev.mkdir(parents=True)
    photo(100).save(ev / "eval0.png")
    return root


def build(out: Path, shared: Path | None, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    return C.build_corpus(out, shared, **kw)


def test_manifest_records_source_licence_size_and_hash(tmp_path, shared):
    m = build(tmp_path / "corpus", shared)
    files = {Path(r["origin"]).name: r for r in m["files"]}
    assert len(files) == 7
    r = files["p0_by_Someone.jpg"]
    assert r["source"] == "shared:photos/train" and r["licence"] == "CC-BY-4.0"
    assert r["licence_file"].endswith("COPYRIGHT.lomiri-wallpapers.txt")
    assert files["p1_by_Someone.jpg"]["licence"] == "CC0-1.0"
    assert files["p2_by_Someone.jpg"]["licence"].startswith("CC-BY-4.0, CC-BY-SA")  # the folder's table entry
    g = files["erase__alpaca.webp"]
    assert g["licence"] == "CC-BY-SA-4.0" and g["author"] == "A. Photographer"
    src = shared / "photos/train/p0_by_Someone.jpg"
    import hashlib

    assert r["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (r["original_bytes"], r["original_width"], r["original_height"]) == (src.stat().st_size, 160, 120)
    out = tmp_path / "corpus" / r["file"]
    assert out.read_bytes() == src.read_bytes()  # small JPEG: kept as it is
    assert r["out_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    lines = (tmp_path / "corpus/manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["file"] for x in lines] == [r["file"] for r in m["files"]]
    assert "CC-BY-SA-4.0" in (tmp_path / "corpus/ATTRIBUTION.md").read_text()


def test_exact_and_near_duplicates_are_dropped_and_recorded(tmp_path, shared):
    mine = tmp_path / "mine"
    mine.mkdir()
    src = shared / "photos/train/p3_by_Someone.jpg"
    (mine / "copy.jpg").write_bytes(src.read_bytes())  # exact duplicate
    with Image.open(src) as im:
        im.resize((100, 75), Image.Resampling.LANCZOS).save(mine / "small_copy.png")  # resized copy
    photo(55).save(mine / "new.png")
    m = build(tmp_path / "corpus", shared, folders=[mine])
    reasons = {Path(d["origin"]).name: d for d in m["dropped"]}
    assert reasons["copy.jpg"]["reason"] == "exact duplicate"
    assert reasons["small_copy.png"]["reason"] == "near duplicate"
    assert reasons["small_copy.png"]["duplicate_of"].endswith("p3_by_Someone.jpg")
    assert reasons["small_copy.png"]["dhash_distance"] <= C.DHASH_MAX_DISTANCE
    kept = {Path(r["origin"]).name for r in m["files"]}
    assert "new.png" in kept and "p3_by_Someone.jpg" in kept  # the larger original stays
    assert m["counts"]["dropped_exact_duplicate"] == 1 and m["counts"]["dropped_near_duplicate"] == 1


def test_bigger_copy_wins_over_the_earlier_smaller_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    photo(7, (120, 90)).save(a / "small.png")
    photo(7, (480, 360)).save(b / "big.png")
    m = build(tmp_path / "corpus", None, folders=[a, b])
    assert [Path(r["origin"]).name for r in m["files"]] == ["big.png"]


def test_split_is_by_content_and_deterministic(tmp_path, shared):
    m1 = build(tmp_path / "c1", shared, val_percent=40)
    mine = tmp_path / "mine"
    mine.mkdir()
    # the same images listed in another order and under other names, from another folder
    for i, p in enumerate(sorted((shared / "photos/train").iterdir(), reverse=True)):
        if p.suffix == ".jpg":
            (mine / f"z{i}_{p.name}").write_bytes(p.read_bytes())
    m2 = build(tmp_path / "c2", None, folders=[mine], val_percent=40)
    s1 = {r["sha256"]: r["split"] for r in m1["files"]}
    s2 = {r["sha256"]: r["split"] for r in m2["files"]}
    assert s2 and all(s1[k] == v for k, v in s2.items())
    assert {"train", "val"} == set(s1.values())
    for r in m1["files"]:
        assert r["file"].startswith(r["split"] + "/") and (tmp_path / "c1" / r["file"]).is_file()


def test_eval_images_never_go_in(tmp_path, shared):
    with pytest.raises(C.CorpusError, match="evaluation"):
        build(tmp_path / "c", shared, folders=[shared / "photos/eval"])
    with pytest.raises(C.CorpusError, match="evaluation"):
        build(tmp_path / "c", shared, folders=[shared / "photos"])  # a folder above the eval folder
    with pytest.raises(C.CorpusError, match="evaluation"):
        C.check_allowed_folder(shared / "photos/eval_kodak_tid2013", shared)
    with pytest.raises(C.CorpusError, match="evaluation set"):
        C.gather_video(shared, 10, 0, 600)
    # an eval photo copied into a user's folder, as it is or resized, is recognised and dropped
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "renamed.png").write_bytes((shared / "photos/eval/eval0.png").read_bytes())
    with Image.open(shared / "photos/eval/eval0.png") as im:
        im.resize((100, 75)).save(mine / "eval_small.jpg")
    m = build(tmp_path / "c", shared, folders=[mine])
    dropped = {Path(d["origin"]).name: d["reason"] for d in m["dropped"]}
    assert dropped == {"renamed.png": "eval", "eval_small.jpg": "eval"}
    assert not any("eval" in r["origin"] for r in m["files"])


@pytest.mark.parametrize("target", ["/usr/share/wallpapers", "/usr/share/wallpapers/Next/contents",
                                    "/usr/share/backgrounds/mate", "/usr/share/backgrounds/mate/nature", "/usr/share",
                                    "plasma-workspace-wallpapers", "mate-backgrounds"])
def test_reserved_folders_and_packages_are_refused(tmp_path, target):
    with pytest.raises(C.CorpusError, match="reserved for independent evaluation"):
        build(tmp_path / "c", None, folders=[Path(target)])
    assert not (tmp_path / "c").exists()


def test_reserved_packages_refused_and_link_into_reserved_folder(tmp_path):
    for name in C.RESERVED_PACKAGES:
        with pytest.raises(C.CorpusError, match="reserved"):
            build(tmp_path / "c", None, packages=[name], install=True)
    # a fake install root: its reserved folders are refused too, also through a symlink
    root = tmp_path / "root"
    (root / "usr/share/backgrounds/mate").mkdir(parents=True)
    photo(3).save(root / "usr/share/backgrounds/mate/a.png")
    link = tmp_path / "innocent"
    link.symlink_to(root / "usr/share/backgrounds/mate")
    with pytest.raises(C.CorpusError, match="mate-backgrounds"):
        build(tmp_path / "c", None, folders=[link], package_root=root)


def test_cli_refuses_reserved_with_exit_2(tmp_path):
    for args in (["--from", "/usr/share/wallpapers"], ["--install-packages", "mate-backgrounds"]):
        proc = subprocess.run([sys.executable, "-m", "mridc.cloud.cli", "data", "--out", str(tmp_path / "c"),
                               "--no-shared", *args], capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "reserved for independent evaluation" in proc.stderr and "Traceback" not in proc.stderr


def test_rerun_is_idempotent_and_resizes_to_max_side(tmp_path, shared):
    mine = tmp_path / "mine"
    mine.mkdir()
    photo(77, (900, 300)).save(mine / "wide.jpg", quality=92)
    out = tmp_path / "corpus"
    logs: list[str] = []
    m1 = build(out, shared, folders=[mine], max_side=300, log=logs.append)
    wide = next(r for r in m1["files"] if r["origin"].endswith("wide.jpg"))
    assert (wide["width"], wide["height"], wide["resized"], wide["file"][-4:]) == (300, 100, True, ".png")
    with Image.open(out / wide["file"]) as im:
        assert im.size == (300, 100)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.parent.name in ("train", "val")}
    m2 = build(out, shared, folders=[mine], max_side=300, log=logs.append)
    assert m2["files"] == m1["files"] and m2["dropped"] == m1["dropped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.parent.name in ("train", "val")} == stamps
    assert "0 written, 8 already there" in logs[-1]
    assert not list(out.rglob(".tmp-*"))
    # another --max-side rewrites only what it changes and removes the old file
    m3 = build(out, shared, folders=[mine], max_side=600, log=logs.append)
    wide3 = next(r for r in m3["files"] if r["origin"].endswith("wide.jpg"))
    assert (wide3["width"], wide3["file"]) == (600, wide["file"])
    with Image.open(out / wide["file"]) as im:
        assert im.size == (600, 200)
    assert "1 written, 7 already there, 0 removed" in logs[-1]
    # an image no longer among the sources is removed from the corpus
    (mine / "wide.jpg").unlink()
    m4 = build(out, shared, max_side=600, log=logs.append)
    assert len(m4["files"]) == 7 and not (out / wide["file"]).exists()
    assert "0 written, 7 already there, 1 removed" in logs[-1]


def test_corrupt_file_is_skipped_with_a_reason(tmp_path, shared):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = mine / "truncated.png"
    photo(9, (300, 200)).save(good)
    good.write_bytes(good.read_bytes()[:400])
    photo(12).save(mine / "fine.png")
    photo(13, (40, 30)).save(mine / "tiny.png")
    m = build(tmp_path / "corpus", shared, folders=[mine])
    dropped = {Path(d["origin"]).name: d for d in m["dropped"]}
    assert dropped["broken.jpg"]["reason"] == "corrupt" and "unreadable" in dropped["broken.jpg"]["detail"]
    assert dropped["truncated.png"]["reason"] == "corrupt"
    assert dropped["tiny.png"]["reason"] == "too small"
    assert any(r["origin"].endswith("fine.png") for r in m["files"])


def test_user_folder_licence_from_license_file(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    photo(1).save(mine / "sub" / "a.png")
    (mine / "sub" / "LICENSE").write_text("Licensed under https://creativecommons.org/licenses/by-sa/3.0/\n")
    photo(2).save(mine / "b.png")
    m = build(tmp_path / "c", None, folders=[mine])
    lic = {Path(r["origin"]).name: r["licence"] for r in m["files"]}
    assert lic["a.png"] == "CC-BY-SA-3.0" and lic["b.png"].startswith("unknown")


def _rcc(files: dict[str, bytes]) -> bytes:
    """A minimal Qt .rcc (version 2, zlib-compressed entries) holding /gcompris/src/activities/<...>."""
    tree_nodes, names, payload = [], b"", b""

    def name_off(n: str) -> int:
        nonlocal names
        off = len(names)
        names += struct.pack(">HI", len(n), 0) + n.encode("utf-16-be")
        return off

    # root -> gcompris -> src -> activities -> erase -> resource -> files
    dirs = ["", "gcompris", "src", "activities", "erase", "resource"]
    for i, d in enumerate(dirs):
        tree_nodes.append([name_off(d) if d else 0, 0x02, 1, i + 1])
    tree_nodes[-1][2] = len(files)
    for n, blob in files.items():
        packed = struct.pack(">I", len(blob)) + zlib.compress(blob)
        off = len(payload)
        payload += struct.pack(">I", len(packed)) + packed
        tree_nodes.append([name_off(n), 0x01, None, off])
    tree = b""
    for no, flags, a, b in tree_nodes:
        if flags & 0x02:
            tree += struct.pack(">IHII", no, flags, a, b) + b"\0" * 8
        else:
            tree += struct.pack(">IHhhI", no, flags, 0, 0, b) + b"\0" * 8
    header = 20
    return b"qres" + struct.pack(">4I", 2, header, header + len(tree), header + len(tree) + len(payload)) + \
        tree + payload + names


def test_qt_rcc_archives_are_unpacked(tmp_path):
    import io

    buf = io.BytesIO()
    photo(5).save(buf, format="WEBP", quality=90)
    credits = b"Copyright: Somebody\nLicense: CC0-1.0\nFiles:\nbee.webp\n"
    data = _rcc({"bee.webp": buf.getvalue(), "CREDITS__README": credits})
    members = C.read_rcc(data)
    assert members["/gcompris/src/activities/erase/resource/bee.webp"] == buf.getvalue()
    root = tmp_path / "root"
    (root / "usr/share/gcompris-qt/rcc").mkdir(parents=True)
    (root / "usr/share/gcompris-qt/rcc/erase.rcc").write_bytes(data)
    m = build(tmp_path / "c", None, packages=["gcompris-qt-data"], package_root=root)
    (r,) = m["files"]
    assert r["source"] == "package:gcompris-qt-data" and r["licence"] == "CC0-1.0" and "erase__bee" in r["file"]


def test_training_defaults_use_a_built_corpus(tmp_path, shared, monkeypatch):
    from mridc.cloud.data import default_train_sources, default_val_sources

    monkeypatch.setenv("MRIDC_CORPUS", str(tmp_path / "none-yet"))
    assert default_train_sources(shared)[0] == str(shared / "photos/train")
    build(tmp_path / "corpus", shared, val_percent=40)
    monkeypatch.setenv("MRIDC_CORPUS", str(tmp_path / "corpus"))
    assert default_train_sources(shared) == [str(tmp_path / "corpus/train")]
    assert default_val_sources(shared) == [str(tmp_path / "corpus/val")]
    monkeypatch.setenv("MRIDC_CORPUS", "off")
    assert default_val_sources(shared)[0].endswith("vtest.avi:490-499:3")
