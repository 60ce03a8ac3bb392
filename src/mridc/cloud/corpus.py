"""The training corpus, built with provenance: `mridc-cloud data` / `make data`.

Images are gathered from the training folders of the shared data folder (photos/train, photos/train_small,
photos/train_extra/*), every Nth frame of camera/vtest.avi 0-489, the user's own folders (--from) and, with
--install-packages, a few Debian packages of photos. Each image's source, licence, original size and SHA-256
go into manifest.json; exact duplicates (SHA-256) and near duplicates (64-bit dHash and pHash within a Hamming
threshold) are dropped and recorded there with the reason; the rest is split into train/ and val/ by a hash
of the content (not by listing order), and written as PNG (JPEG/WebP/PNG bytes kept as they are when no
resize is needed), at most --max-side pixels on the long side.

Evaluation images never go in: photos/eval, photos/eval_kodak_tid2013 and vtest frames 500+ are refused as
sources, and any image equal or near to an evaluation photo is dropped. The packages plasma-workspace-wallpapers
and mate-backgrounds (and their folders) are reserved for independent evaluation and refused outright.

The build is idempotent (hashes are cached by path, size and mtime; files already written are kept) and safe
on a crash (every file is written under a temporary name, then renamed; manifest.json, written last, marks a
complete corpus). See docs/data.md.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pnm"}
KEEP_AS_IS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # formats whose bytes are copied unchanged
DEFAULT_MAX_SIDE = 1600
DEFAULT_VAL_PERCENT = 5.0
DEFAULT_VIDEO_EVERY = 10
VIDEO_TRAIN_FRAMES = (0, 489)  # vtest 490-499 held out, 500+ is the evaluation set
VIDEO_EVAL_FIRST = 500
VIDEO_SPLIT_SEGMENT = 50  # frames this close together land in the same split
DHASH_MAX_DISTANCE = 10  # near duplicate: both 64-bit hashes within these Hamming distances
PHASH_MAX_DISTANCE = 12
MIN_SIDE = 64
MAX_PIXELS = 120_000_000

# Reserved for independent evaluation: never read, whatever is asked.
RESERVED_PACKAGES = {"plasma-workspace-wallpapers": ("/usr/share/wallpapers",),
                     "mate-backgrounds": ("/usr/share/backgrounds/mate", "/usr/share/mate-background-properties")}
EVAL_FOLDERS = ("photos/eval", "photos/eval_kodak_tid2013")
SHARED_VIDEO = "camera/vtest.avi"


@dataclass(frozen=True)
class SharedSource:
    folder: str  # relative to the shared data folder
    package: str  # where the files came from (the data README's table)
    licence: str  # folder-level licence (used when no per-file licence is found)
    redistribute: str  # may copies be committed or shared (the README's last column)
    licence_file: str = ""  # relative to the shared data folder
    per_file: bool = False  # look for each file's own licence beside it first


SHARED_SOURCES = (
    SharedSource("photos/train", "Debian lomiri-wallpapers-16.04/-20.04 20.04.0-2",
                 "CC-BY-4.0, CC-BY-SA-3.0/4.0 or CC0-1.0 per file (COPYRIGHT.lomiri-wallpapers.txt)",
                 "yes, with attribution", "photos/COPYRIGHT.lomiri-wallpapers.txt", True),
    SharedSource("photos/train_small", "Debian opencv-doc 4.6.0 (samples/data)",
                 "Apache-2.0 AND BSD-3-Clause (opencv-doc package); image provenance undocumented", "no",
                 "photos/COPYRIGHT.opencv-doc.txt"),
    SharedSource("photos/train_extra/gcompris", "Debian gcompris-qt-data 3.1-2 (unpacked from its .rcc archives)",
                 "per-activity credits (*__CREDITS__README); COPYRIGHT.gcompris-qt-data.txt", "yes, with the credits",
                 "photos/train_extra/gcompris/COPYRIGHT.gcompris-qt-data.txt", True),
    SharedSource("photos/train_extra/lxqt", "Debian lxqt-themes 1.2.0-1", "CC-BY-SA-3.0", "yes, with attribution",
                 "photos/train_extra/lxqt/License"),
    SharedSource("photos/train_extra/palapeli", "Debian palapeli-data 22.12.3",
                 "FDL or public domain per .desktop file", "yes, with attribution",
                 "photos/train_extra/palapeli/COPYRIGHT.palapeli-data.txt", True),
)
VIDEO_SOURCE = SharedSource(SHARED_VIDEO, "Debian opencv-doc 4.6.0 (samples/data)",
                            "Apache-2.0 AND BSD-3-Clause (opencv-doc package)",
                            "a short re-encoded clip with attribution", "photos/COPYRIGHT.opencv-doc.txt")


@dataclass(frozen=True)
class PackageSpec:
    root: str  # installed folder
    files: tuple[str, ...] = ()  # glob patterns under root ('' = every image in root, not recursive)
    licence: str = ""  # folder-level licence when the files carry none
    kind: str = "files"  # files, rcc (Qt resource archives) or skip (not extracted: why in `licence`)
    note: str = ""


GCOMPRIS_ACTIVITIES = ("erase", "explore_farm_animals", "explore_monuments", "explore_world_animals",
                       "explore_world_music")
PACKAGES = {
    "gcompris-qt-data": PackageSpec("usr/share/gcompris-qt/rcc", ("*.rcc",), "per-activity credits", "rcc"),
    "lxqt-themes": PackageSpec("usr/share/lxqt/wallpapers",
                               ("Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png",
                                "beam.png", "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg",
                                "this-is-not-windows.jpg"), "CC-BY-SA-3.0"),
    "palapeli-data": PackageSpec("usr/share/palapeli/collection", ("*.jpg",), "per .desktop file"),
    "libjxl-testdata": PackageSpec("usr/share/libjxl-testdata",
                                   ("jxl/flower/flower.png", "external/wesaturate/500px/*_srgb8.png"),
                                   "per file (Debian copyright)"),
    "jigzo-data": PackageSpec("usr/share/games/jigzo/puzzles", (), kind="skip",
                              note="photos are cut into .pzl puzzle atlases; not extracted"),
}
DEFAULT_PACKAGES = tuple(PACKAGES)


class CorpusError(ValueError):
    """A request the corpus builder refuses (reserved or evaluation data, bad arguments)."""


# ---------------------------------------------------------------- where the corpus lives


def default_corpus_dir() -> Path:
    """$MRIDC_CORPUS if set, else <repo>/data/corpus."""
    from mridc.shared.zoo import REPO_ROOT

    env = os.environ.get("MRIDC_CORPUS")
    return Path(env) if env else REPO_ROOT / "data" / "corpus"


def built_corpus(path: Path | None = None) -> Path | None:
    """The corpus folder when a complete corpus is there (manifest.json written), else None.
    MRIDC_CORPUS=off makes training use the shared data folder's images as before."""
    if path is None and os.environ.get("MRIDC_CORPUS", "").lower() in ("off", "none", "0"):
        return None
    path = default_corpus_dir() if path is None else Path(path)
    return path if (path / "manifest.json").is_file() and (path / "train").is_dir() else None


# ---------------------------------------------------------------- refusals


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _overlaps(path: Path, folder: Path) -> bool:
    """path is the folder, inside it, or above it (reading it recursively would reach the folder)."""
    return _inside(path, folder) or _inside(folder, path)


def check_allowed_folder(path: Path, shared: Path | None, pkg_root: Path = Path("/")) -> Path:
    """Refuse reserved packages' folders and evaluation folders; returns the resolved folder."""
    raw = str(path)
    if raw in RESERVED_PACKAGES:
        raise CorpusError(f"{raw} is reserved for independent evaluation and never used for training")
    resolved = Path(path).expanduser().resolve()
    for package, folders in RESERVED_PACKAGES.items():
        for folder in folders:
            for base in {Path(folder), (pkg_root / folder.lstrip("/")).resolve()}:
                if _overlaps(resolved, base):
                    raise CorpusError(f"{path}: {base} holds the {package} images, reserved for independent "
                                      "evaluation; they are never used for training")
    if shared is not None:
        for rel in EVAL_FOLDERS:
            folder = (shared / rel).resolve()
            if _overlaps(resolved, folder):
                raise CorpusError(f"{path}: {folder} holds evaluation images; never train on them")
        if resolved == (shared / SHARED_VIDEO).resolve():
            raise CorpusError(f"{path}: the corpus takes vtest frames {VIDEO_TRAIN_FRAMES[0]}-{VIDEO_TRAIN_FRAMES[1]} "
                              f"itself; frames {VIDEO_EVAL_FIRST}+ are the evaluation set")
    return resolved


def check_packages(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        if name in RESERVED_PACKAGES:
            raise CorpusError(f"package {name} is reserved for independent evaluation and never used for training")
        if name not in PACKAGES:
            raise CorpusError(f"unknown package {name}; known: {', '.join(PACKAGES)}")
        out.append(name)
    return out


# ---------------------------------------------------------------- licences


def _blocks(text: str) -> list[list[str]]:
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def parse_stanzas(text: str) -> list[dict[str, object]]:
    """Debian copyright stanzas and gcompris CREDITS blocks: 'Key: value' lines; Files may continue on the
    following lines (one or more names each)."""
    out = []
    for block in _blocks(text):
        entry: dict[str, object] = {"files": []}
        key = None
        for line in block:
            m = re.match(r"^([A-Za-z][A-Za-z-]*):\s*(.*)$", line)
            if m and not line.startswith((" ", "\t")):
                key = m.group(1).lower()
                if key == "files":
                    entry["files"] += m.group(2).split()
                else:
                    entry[key] = m.group(2).strip()
            elif key == "files":
                entry["files"] += line.split()
            elif key:
                entry[key] = f"{entry.get(key, '')} {line.strip()}".strip()
        if entry["files"]:
            out.append(entry)
    return out


def _cc_licence(text: str) -> str | None:
    m = re.search(r"licenses/((?:by|by-sa|by-nc|by-nd|by-nc-sa|by-nc-nd))/(\d\.\d)", text)
    if m:
        return f"CC-{m.group(1).upper()}-{m.group(2)}"
    if re.search(r"publicdomain/zero/1\.0", text):
        return "CC0-1.0"
    return None


def _licence_from_text(text: str) -> str | None:
    cc = _cc_licence(text)
    if cc:
        return cc
    for line in text.splitlines():
        m = re.match(r"^\s*Licen[cs]e[d]?\s*(?:under)?\s*:?\s*(\S.*)$", line, re.IGNORECASE)
        if m:
            return m.group(1).strip()[:120]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first[:120] or None


def normalise_licence(text: str) -> str:
    """'CC-BY-SA 4.0' -> 'CC-BY-SA-4.0', 'Public domain' -> 'Public Domain' (as the credits files vary)."""
    text = " ".join(text.split())
    m = re.fullmatch(r"(?i)(CC[- ]BY(?:-SA|-NC|-ND)*)[- ](\d\.\d)", text)
    if m:
        return f"{m.group(1).upper().replace(' ', '-')}-{m.group(2)}"
    return "Public Domain" if text.lower() == "public domain" else text


@dataclass
class Licence:
    licence: str
    file: str | None = None  # the file it was read from
    author: str | None = None
    url: str | None = None

    def __post_init__(self):
        self.licence = normalise_licence(self.licence)


class LicenceFinder:
    """Per-file licences from the files beside the images: KDE .desktop files, gcompris-style
    `<prefix>__CREDITS__README` blocks, Debian copyright files (here or one folder up), a folder `License`
    file, then the folder's licence from the data README's table."""

    def __init__(self, extra_texts: dict[str, str] | None = None):
        self._dir_cache: dict[Path, dict] = {}
        self.extra_texts = extra_texts or {}  # credits read from archives: name -> text

    def _folder(self, folder: Path) -> dict:
        if folder in self._dir_cache:
            return self._dir_cache[folder]
        info: dict[str, object] = {"credits": [], "debian": [], "license": None}
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        for name in names:
            p = folder / name
            if "CREDITS" in name and p.is_file():
                prefix = name.split("__CREDITS")[0] + "__" if "__CREDITS" in name else ""
                info["credits"].append((prefix, parse_stanzas(p.read_text(errors="replace")), p))
            elif name.lower() in {"license", "licence", "license.txt", "licence.txt", "copying"} and p.is_file():
                info["license"] = p
        for d in (folder, folder.parent):
            try:
                dnames = sorted(os.listdir(d))
            except OSError:
                continue
            for name in dnames:
                if (name.lower().startswith("copyright") or name == "copyright") and (d / name).is_file():
                    text = (d / name).read_text(errors="replace")
                    if "Files:" in text:
                        info["debian"].append((parse_stanzas(text), d / name))
        self._dir_cache[folder] = info
        return info

    def find(self, path: Path, fallback: str | None = None, package_copyright: Path | None = None,
             rel: str | None = None) -> Licence:
        """`rel`: the file's path as a package's copyright file names it (default: relative to that file)."""
        folder = path.parent
        info = self._folder(folder)
        desktop = folder / f"{path.stem}.desktop"
        if desktop.is_file():
            fields = dict(re.findall(r"^([\w-]+)=(.*)$", desktop.read_text(errors="replace"), re.MULTILINE))
            lic = fields.get("X-KDE-PluginInfo-License")
            if lic:
                return Licence(lic, str(desktop), fields.get("X-KDE-PluginInfo-Author") or None,
                               fields.get("X-KDE-PluginInfo-Website") or None)
        for prefix, stanzas, credits_file in info["credits"]:
            if prefix and not path.name.startswith(prefix):
                continue
            name = path.name[len(prefix):]
            for s in stanzas:
                if (name in s["files"] or name in {Path(f).name for f in s["files"]}) and s.get("license"):
                    return Licence(str(s["license"]), str(credits_file), s.get("copyright"), s.get("source"))
        debian = list(info["debian"])
        if package_copyright is not None and package_copyright.is_file():
            debian.append((parse_stanzas(package_copyright.read_text(errors="replace")), package_copyright))
        generic = None
        for stanzas, cfile in debian:
            if rel is not None and cfile == package_copyright:
                parts = Path(rel).parts
            elif _inside(path, cfile.parent):
                parts = path.relative_to(cfile.parent).parts
            else:
                parts = (path.name,)
            tails = ["/".join(parts[i:]) for i in range(len(parts))]
            hit = None
            for s in stanzas:  # the last matching stanza wins (Debian copyright format)
                for pattern in s["files"]:
                    base = pattern.rsplit("/", 1)[-1]
                    literal = not any(ch in base for ch in "*?[") and base == path.name  # 16.04/NAME.jpg
                    if (literal or any(fnmatch.fnmatchcase(t, pattern) for t in tails)) and s.get("license"):
                        hit = (pattern, s)
            if hit:  # the first line of a License field names it; the rest is its text
                lic = Licence(str(hit[1]["license"]).split()[0], str(cfile), hit[1].get("copyright"))
                if hit[0] != "*":
                    return lic
                generic = generic or lic
        if info["license"] is not None:
            lic = _licence_from_text(Path(info["license"]).read_text(errors="replace"))
            if lic:
                return Licence(lic, str(info["license"]))
        if fallback:
            return Licence(fallback, None)
        if generic is not None:
            return generic
        return Licence("unknown (no licence file found beside the images)", None)


# ---------------------------------------------------------------- perceptual hashes


def _gray(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(img.convert("L").resize(size, Image.Resampling.BOX if img.width >= size[0] * 2
                                              else Image.Resampling.BILINEAR), dtype=np.float64)


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, bit = left pixel brighter than its right neighbour."""
    g = _gray(img, (9, 8))
    bits = (g[:, :-1] > g[:, 1:]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))
    m[0] *= 1 / np.sqrt(2)
    return m * np.sqrt(2 / n)


_DCT32 = _dct_matrix(32)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash: 8x8 lowest frequencies of the DCT of a 32x32 grey thumbnail vs their median."""
    g = _gray(img, (32, 32))
    d = (_DCT32 @ g @ _DCT32.T)[:8, :8].flatten()
    med = np.median(d[1:])
    bits = d > med
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ---------------------------------------------------------------- Qt resource archives (gcompris)


def read_rcc(data: bytes) -> dict[str, bytes]:
    """The files of a Qt binary resource (.rcc): {path: bytes}. zlib-compressed entries are inflated
    (qCompress: 4-byte big-endian length, then a zlib stream); zstd-compressed ones are skipped."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource archive")
    version, tree, payload, names = struct.unpack(">4I", data[4:20])
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported rcc version {version}")
    node = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        (length,) = struct.unpack(">H", data[names + off:names + off + 2])
        return data[names + off + 6:names + off + 6 + 2 * length].decode("utf-16-be")

    out: dict[str, bytes] = {}

    def walk(index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ValueError("rcc tree too deep")
        base = tree + index * node
        name_off, flags = struct.unpack(">IH", data[base:base + 6])
        name = "" if index == 0 else name_at(name_off)
        path = f"{prefix}/{name}" if name else prefix
        if flags & 0x02:  # directory
            count, first = struct.unpack(">II", data[base + 6:base + 14])
            for child in range(first, first + count):
                walk(child, path, depth + 1)
            return
        (off,) = struct.unpack(">I", data[base + 10:base + 14])
        (size,) = struct.unpack(">I", data[payload + off:payload + off + 4])
        blob = data[payload + off + 4:payload + off + 4 + size]
        if flags & 0x04:  # zstd: not needed for the packages here
            return
        if flags & 0x01:
            blob = zlib.decompress(blob[4:])
        out[path] = blob

    walk(0, "", 0)
    return out


# ---------------------------------------------------------------- candidates


@dataclass
class Candidate:
    source: str  # e.g. shared:photos/train, package:lxqt-themes, folder:/home/me/photos, video:camera/vtest.avi
    origin: str  # the original file (path, package path, archive member or video#frame)
    licence: Licence
    package: str | None = None
    redistribute: str | None = None
    path: Path | None = None  # the file on disk, when there is one
    data: bytes | None = None  # bytes held in memory (archive members)
    pixels: np.ndarray | None = None  # video frames (RGB)
    frame: int | None = None
    group: str | None = None  # frames of one video: not compared with each other for near duplicates
    order: int = 0
    info: dict = field(default_factory=dict)  # sha256, dhash, phash, width, height, format, bytes

    @property
    def stem(self) -> str:
        if self.frame is not None:
            return f"{Path(self.origin.split('#')[0]).stem}_f{self.frame:04d}"
        return Path(self.origin).stem


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def gather_shared(shared: Path, finder: LicenceFinder) -> list[Candidate]:
    out = []
    for src in SHARED_SOURCES:
        folder = shared / src.folder
        if not folder.is_dir():
            continue
        folder_licence = Licence(src.licence, str(shared / src.licence_file) if src.licence_file else None)
        for p in _images_in(folder, recursive=False):
            lic = finder.find(p, src.licence) if src.per_file else folder_licence
            if lic.file is None:
                lic = folder_licence
            out.append(Candidate(f"shared:{src.folder}", str(p.relative_to(shared)), lic, src.package,
                                 src.redistribute, path=p))
    return out


def read_video(path: Path, first: int, last: int, every: int) -> list[tuple[int, np.ndarray]]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    frames, index = [], 0
    while index <= last:
        ok, frame = cap.read()
        if not ok:
            break
        if index >= first and (index - first) % every == 0:
            frames.append((index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        index += 1
    cap.release()
    return frames


def gather_video(shared: Path, every: int, first: int = VIDEO_TRAIN_FRAMES[0],
                 last: int = VIDEO_TRAIN_FRAMES[1]) -> list[Candidate]:
    if last >= VIDEO_EVAL_FIRST:
        raise CorpusError(f"vtest frames {VIDEO_EVAL_FIRST}+ are the evaluation set; never train on them")
    path = shared / SHARED_VIDEO
    if not path.is_file() or every <= 0:
        return []
    lic = Licence(VIDEO_SOURCE.licence, str(shared / VIDEO_SOURCE.licence_file))
    return [Candidate(f"video:{SHARED_VIDEO}", f"{SHARED_VIDEO}#{i}", lic, VIDEO_SOURCE.package,
                      VIDEO_SOURCE.redistribute, path=path, pixels=px, frame=i, group=SHARED_VIDEO)
            for i, px in read_video(path, first, last, every)]


def gather_folder(folder: Path, finder: LicenceFinder, shared: Path | None) -> list[Candidate]:
    resolved = check_allowed_folder(folder, shared)
    if resolved.is_file():
        files = [resolved] if resolved.suffix.lower() in IMAGE_SUFFIXES else []
    elif resolved.is_dir():
        files = _images_in(resolved, recursive=True)
    else:
        raise CorpusError(f"--from {folder}: no such folder")
    out = []
    for p in files:
        check_allowed_folder(p.resolve(), shared)  # a link out of the folder into reserved data
        out.append(Candidate(f"folder:{resolved}", str(p), finder.find(p), None, "as the licence says", path=p))
    if not out:
        raise CorpusError(f"--from {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def _dpkg_version(name: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}", name], capture_output=True, text=True,
                          check=False)
    status, _, version = proc.stdout.partition("|")
    return version if proc.returncode == 0 and "installed" in status.split() else None


def install_packages(names: list[str], log=print) -> None:
    """apt-get install the packages that are missing (root only; a clear error otherwise)."""
    missing = [n for n in check_packages(names) if _dpkg_version(n) is None]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise CorpusError(f"--install-packages needs apt-get (Debian/Ubuntu); missing: {' '.join(missing)}")
    if os.geteuid() != 0:
        raise CorpusError(f"--install-packages needs root for apt-get; run `sudo apt-get install {' '.join(missing)}` "
                          "and then `mridc-cloud data --install-packages` again")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    log(f"installing {' '.join(missing)} (apt-get)")
    if subprocess.run(cmd, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CorpusError(f"apt-get install {' '.join(missing)} failed: {proc.stderr.strip()[-300:]}")


def gather_package(name: str, finder: LicenceFinder, root: Path = Path("/"), log=print) -> list[Candidate]:
    check_packages([name])
    spec = PACKAGES[name]
    if spec.kind == "skip":
        log(f"{name}: {spec.note}")
        return []
    folder = root / spec.root
    if not folder.is_dir():
        log(f"{name}: {folder} not found (package not installed?)")
        return []
    version = _dpkg_version(name) if root == Path("/") else None
    package = f"Debian {name}" + (f" {version}" if version else "")
    copyright_file = root / "usr/share/doc" / name / "copyright"
    files = sorted({p for pattern in spec.files for p in folder.glob(pattern) if p.is_file()})
    out = []
    if spec.kind == "rcc":
        for rcc in files:
            try:
                members = read_rcc(rcc.read_bytes())
            except (ValueError, struct.error, zlib.error) as exc:
                log(f"{name}: {rcc.name}: {exc}")
                continue
            out += _gcompris_members(name, package, rcc, members, copyright_file)
        return out
    for p in files:
        lic = finder.find(p, None if spec.licence.startswith("per") else spec.licence, copyright_file,
                          str(p.relative_to(folder)))
        out.append(Candidate(f"package:{name}", str(p), lic, package, "yes, with attribution", path=p))
    return out


def _gcompris_members(name: str, package: str, rcc: Path, members: dict[str, bytes],
                      copyright_file: Path) -> list[Candidate]:
    out = []
    by_activity: dict[str, dict[str, bytes]] = {}
    for member, blob in members.items():
        parts = member.strip("/").split("/")
        if "activities" not in parts:
            continue
        i = parts.index("activities")
        if i + 1 >= len(parts) or parts[i + 1] not in GCOMPRIS_ACTIVITIES:
            continue
        by_activity.setdefault(parts[i + 1], {})[member] = blob
    for activity, files in sorted(by_activity.items()):
        stanzas = []
        for member, blob in files.items():
            if "CREDITS" in member or member.endswith("README"):
                stanzas += parse_stanzas(blob.decode("utf-8", "replace"))
        for member, blob in sorted(files.items()):
            if Path(member).suffix.lower() not in {".webp", ".jpg", ".jpeg", ".png"}:
                continue
            base = Path(member).name
            hit = next((s for s in stanzas if base in s["files"] and s.get("license")), None)
            lic = (Licence(str(hit["license"]), f"{rcc}:{activity} credits", hit.get("copyright"), hit.get("source"))
                   if hit else Licence("see the package copyright file", str(copyright_file)))
            out.append(Candidate(f"package:{name}", f"{rcc.name}:{member}", lic, package, "yes, with the credits",
                                 data=blob, info={"name": f"{activity}__{base}"}))
    return out


# ---------------------------------------------------------------- the build


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def _source_bytes(c: Candidate) -> bytes:
    if c.data is not None:
        return c.data
    if c.pixels is not None:
        return np.ascontiguousarray(c.pixels).tobytes()
    return c.path.read_bytes()


def _open(c: Candidate) -> Image.Image:
    if c.pixels is not None:
        return Image.fromarray(c.pixels)
    img = Image.open(io.BytesIO(_source_bytes(c)))
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}x{img.height} is over {MAX_PIXELS} pixels")
    img.load()
    return img


def _cache_key(c: Candidate) -> str | None:
    if c.path is None or c.data is not None:
        return None
    st = c.path.stat()
    return f"{c.path.resolve()}|{st.st_size}|{st.st_mtime_ns}" + (f"#{c.frame}" if c.frame is not None else "")


def fingerprint(c: Candidate, cache: dict) -> None:
    """sha256 of the original bytes (frames: of the RGB pixels), format, size and the two hashes; or an error."""
    key = _cache_key(c)
    if key and key in cache:
        c.info.update(cache[key])
        return
    raw = _source_bytes(c)
    info = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    try:
        img = _open(c)
        info["format"] = "frame" if c.pixels is not None else img.format
        info["width"], info["height"] = img.size
        if min(img.size) < MIN_SIDE:
            info["error"] = f"too small: {img.width}x{img.height}, under {MIN_SIDE} pixels"
            c.info.update(info)
            if key:
                cache[key] = info
            return
        rgb = img.convert("RGB")
        info["dhash"] = f"{dhash(rgb):016x}"
        info["phash"] = f"{phash(rgb):016x}"
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable file is recorded and skipped
        info["error"] = f"unreadable: {type(exc).__name__}: {exc}"[:300]
    c.info.update(info)
    if key:
        cache[key] = info


def split_of(c: Candidate, val_percent: float) -> str:
    key = c.info["sha256"]
    if c.frame is not None and c.group:  # nearby frames land together, so val frames are not train neighbours
        key = f"{c.group}|{c.frame // VIDEO_SPLIT_SEGMENT}"
    value = int(hashlib.sha256(f"mridc-corpus-split|{key}".encode()).hexdigest()[:8], 16) / 2**32
    return "val" if value * 100 < val_percent else "train"


def _encode(c: Candidate, max_side: int) -> tuple[bytes, str, tuple[int, int], bool]:
    """The bytes to write, the suffix, the size written and whether it was re-encoded (to PNG): the original
    bytes when no resize is needed and the format is JPEG, PNG or WebP."""
    w, h = c.info["width"], c.info["height"]
    fmt = c.info.get("format")
    if max(w, h) <= max_side and fmt in KEEP_AS_IS and c.pixels is None:
        return _source_bytes(c), KEEP_AS_IS[fmt], (w, h), False
    img = _open(c)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if max(w, h) > max_side:
        f = max_side / max(w, h)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue(), ".png", img.size, True


def _eval_fingerprints(shared: Path | None, cache: dict, finder: LicenceFinder) -> list[Candidate]:
    out = []
    if shared is None:
        return out
    for rel in EVAL_FOLDERS:
        folder = shared / rel
        if folder.is_dir():
            for p in _images_in(folder, recursive=False):
                c = Candidate(f"eval:{rel}", str(p.relative_to(shared)), Licence(""), path=p)
                fingerprint(c, cache)
                if "error" not in c.info:
                    out.append(c)
    return out


def _near(a: Candidate, b: Candidate) -> tuple[int, int] | None:
    dd = hamming(int(a.info["dhash"], 16), int(b.info["dhash"], 16))
    dp = hamming(int(a.info["phash"], 16), int(b.info["phash"], 16))
    return (dd, dp) if dd <= DHASH_MAX_DISTANCE and dp <= PHASH_MAX_DISTANCE else None


def build_corpus(out: Path, shared: Path | None, folders: Iterable[Path] = (), packages: Iterable[str] = (),
                 install: bool = False, max_side: int = DEFAULT_MAX_SIDE, val_percent: float = DEFAULT_VAL_PERCENT,
                 video_every: int = DEFAULT_VIDEO_EVERY, include_shared: bool = True, package_root: Path = Path("/"),
                 progress: bool = True, log=print) -> dict:
    """Build (or bring up to date) the corpus in `out`; returns the manifest."""
    from tqdm import tqdm

    if max_side < MIN_SIDE:
        raise CorpusError(f"--max-side must be at least {MIN_SIDE}")
    if not 0 <= val_percent < 100:
        raise CorpusError("--val-percent must be within 0..100")
    packages = check_packages(packages)
    folders = [Path(f) for f in folders]
    for f in folders:  # refuse before doing anything
        check_allowed_folder(f, shared, package_root)
    out = Path(out)
    if shared is not None and _overlaps(out.resolve(), shared.resolve()):
        raise CorpusError(f"--out {out} is inside the shared data folder {shared}")
    if install and packages:
        install_packages(packages, log)

    finder = LicenceFinder()
    candidates: list[Candidate] = []
    if include_shared and shared is not None:
        candidates += gather_shared(shared, finder)
        candidates += gather_video(shared, video_every)
    for f in folders:
        candidates += gather_folder(f, finder, shared)
    for name in packages:
        candidates += gather_package(name, finder, package_root, log)
    for i, c in enumerate(candidates):
        c.order = i

    out.mkdir(parents=True, exist_ok=True)
    for d in ("train", "val"):
        (out / d).mkdir(exist_ok=True)
    for stale in out.rglob(".tmp-*"):  # left by a crash
        stale.unlink(missing_ok=True)
    cache_path = out / ".cache.json"
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    previous = {}
    if (out / "manifest.json").is_file():
        try:
            previous = {r["file"]: r for r in json.loads((out / "manifest.json").read_text())["files"]}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            previous = {}

    for c in tqdm(candidates, desc="hashing", unit="img", disable=not progress):
        fingerprint(c, cache)
    _atomic_json(cache_path, cache)
    evals = _eval_fingerprints(shared, cache, finder)
    _atomic_json(cache_path, cache)

    dropped: list[dict] = []
    kept: list[Candidate] = []

    def drop(c: Candidate, reason: str, **extra) -> None:
        dropped.append({"source": c.source, "origin": c.origin, "sha256": c.info.get("sha256"),
                        "bytes": c.info.get("bytes"), "reason": reason, **extra})

    # Larger images first (a resized copy loses to its original), then the listing order of the sources.
    ordered = sorted(candidates, key=lambda c: (-(c.info.get("width", 0) * c.info.get("height", 0)), c.order))
    by_sha: dict[str, Candidate] = {}
    eval_sha = {e.info["sha256"]: e for e in evals}
    for c in ordered:
        if "error" in c.info:
            drop(c, "too small" if c.info["error"].startswith("too small") else "corrupt", detail=c.info["error"])
            continue
        sha = c.info["sha256"]
        if sha in eval_sha:
            drop(c, "eval", duplicate_of=eval_sha[sha].origin)
            continue
        near_eval = next(((e, d) for e in evals if (d := _near(c, e))), None)
        if near_eval:
            drop(c, "eval", duplicate_of=near_eval[0].origin, dhash_distance=near_eval[1][0],
                 phash_distance=near_eval[1][1])
            continue
        if sha in by_sha:
            drop(c, "exact duplicate", duplicate_of=by_sha[sha].origin)
            continue
        near = next(((k, d) for k in kept if not (c.group and c.group == k.group) and (d := _near(c, k))), None)
        if near:
            drop(c, "near duplicate", duplicate_of=near[0].origin, dhash_distance=near[1][0],
                 phash_distance=near[1][1])
            continue
        by_sha[sha] = c
        kept.append(c)
    kept.sort(key=lambda c: c.order)

    records = []
    written = skipped = 0
    for c in tqdm(kept, desc="writing", unit="img", disable=not progress):
        split = split_of(c, val_percent)
        name = c.info.get("name") or c.stem
        label = Path(c.source.split(":", 1)[1]).stem
        base = f"{_slug(label)}__{_slug(name)}-{c.info['sha256'][:10]}"
        w, h = c.info["width"], c.info["height"]
        fits = max(w, h) <= max_side  # written at its own size, whatever --max-side was
        same = [r for f, r in previous.items()
                if f.startswith(f"{split}/{base}.") and r.get("sha256") == c.info["sha256"]
                and (r.get("max_side") == max_side or (fits and not r.get("resized")))]
        rec = same[0] if same and (out / same[0]["file"]).is_file() and \
            (out / same[0]["file"]).stat().st_size == same[0]["out_bytes"] else None
        if rec is None:
            data, suffix, (ow, oh), reencoded = _encode(c, max_side)
            rel = f"{split}/{base}{suffix}"
            _atomic_write(out / rel, data)
            written += 1
            out_sha, out_bytes = hashlib.sha256(data).hexdigest(), len(data)
            resized = (ow, oh) != (w, h)
        else:
            skipped += 1
            rel, (ow, oh), out_sha, out_bytes = rec["file"], (rec["width"], rec["height"]), rec["out_sha256"], \
                rec["out_bytes"]
            resized, reencoded = rec.get("resized", False), rec.get("reencoded", False)
        records.append({
            "file": rel, "split": split, "source": c.source, "origin": c.origin, "package": c.package,
            "licence": c.licence.licence, "licence_file": c.licence.file, "author": c.licence.author,
            "url": c.licence.url, "redistribute": c.redistribute, "frame": c.frame,
            "sha256": c.info["sha256"], "original_bytes": c.info["bytes"], "original_format": c.info.get("format"),
            "original_width": w, "original_height": h, "width": ow, "height": oh, "resized": resized,
            "reencoded": reencoded, "max_side": max_side, "out_sha256": out_sha, "out_bytes": out_bytes,
            "dhash": c.info["dhash"], "phash": c.info["phash"]})

    # Files of an earlier build that are no longer part of the corpus (other --max-side, sources removed).
    current = {r["file"] for r in records}
    removed = 0
    for rel in previous:
        if rel not in current and (out / rel).is_file() and "/" in rel and rel.split("/")[0] in ("train", "val"):
            (out / rel).unlink()
            removed += 1

    counts = {"candidates": len(candidates), "kept": len(records),
              "train": sum(r["split"] == "train" for r in records), "val": sum(r["split"] == "val" for r in records),
              "dropped": len(dropped)}
    for reason in ("exact duplicate", "near duplicate", "eval", "corrupt", "too small"):
        counts[f"dropped_{reason.replace(' ', '_')}"] = sum(d["reason"] == reason for d in dropped)
    manifest = {
        "version": CORPUS_VERSION,
        "settings": {"max_side": max_side, "val_percent": val_percent, "video_every": video_every,
                     "video_frames": list(VIDEO_TRAIN_FRAMES), "dhash_max_distance": DHASH_MAX_DISTANCE,
                     "phash_max_distance": PHASH_MAX_DISTANCE, "shared": str(shared) if shared else None,
                     "folders": [str(f) for f in folders], "packages": packages},
        "reserved": {"packages": sorted(RESERVED_PACKAGES), "eval_folders": list(EVAL_FOLDERS),
                     "eval_video_frames": f"{SHARED_VIDEO} {VIDEO_EVAL_FIRST}+"},
        "counts": counts, "files": records, "dropped": sorted(dropped, key=lambda d: (d["source"], d["origin"])),
    }
    _atomic_write(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    _write_attribution(out, records)
    _atomic_json(out / "manifest.json", manifest)  # last: marks a complete corpus
    log(f"corpus {out}: {counts['kept']} images ({counts['train']} train, {counts['val']} val) from "
        f"{counts['candidates']} candidates; dropped {counts['dropped_exact_duplicate']} exact and "
        f"{counts['dropped_near_duplicate']} near duplicates, {counts['dropped_eval']} evaluation images, "
        f"{counts['dropped_corrupt']} unreadable; {written} written, {skipped} already there, {removed} removed")
    return manifest


def _write_attribution(out: Path, records: list[dict]) -> None:
    lines = ["# Attribution", "", "Generated by `mridc-cloud data`; every file's record is in manifest.json.", ""]
    by_source: dict[str, list[dict]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r)
    for source, recs in by_source.items():
        lines += [f"## {source}", "",
                  f"From: {recs[0]['package'] or source}; may be redistributed: {recs[0]['redistribute']}", ""]
        for r in recs:
            who = f", {r['author']}" if r.get("author") else ""
            url = f", {r['url']}" if r.get("url") else ""
            lines.append(f"- `{r['file']}` ({r['origin']}): {r['licence']}{who}{url}")
        lines.append("")
    _atomic_write(out / "ATTRIBUTION.md", "\n".join(lines).encode())
