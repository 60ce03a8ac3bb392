"""Evaluation sets, read in place (nothing is copied into the repository).

Sets by name (``resolve(["photos-eval", "kodak", "vtest"])``), or any folder of images, an image file, or a
video file:

- ``photos-eval``: ``photos/eval/`` (4 CC photos of 2.5-10 MP + 5 scikit-image photos). Large photos are
  reduced with Lanczos to fit ``max_side`` (768 by default, the size of the Kodak set and of most
  low-rate codec comparisons) so a point costs the same on every image; ``max_side=0`` keeps full size.
- ``kodak``: ``photos/eval_kodak_tid2013/``, Kodak kodim03/04/06/08/19 as 512x384 TID2013 crops
  (non-commercial licence: use in place, never commit; not comparable to published 768x512 Kodak figures).
- ``vtest``: frames 500-794 of ``camera/vtest.avi`` (768x576 static surveillance camera; frames 0-499 are
  for training), every ``stride``-th frame. Each frame carries motion boxes (pedestrians) from a median
  background of training frames, for fidelity inside regions of interest.

A folder may hold ``rois.json`` (``{"file name": [[x0, y0, x1, y1], ...]}``) to give boxes for its images.
The data root is ``$MRIDC_DATA`` or ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DATA_ENV = "MRIDC_DATA"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov"}
DEFAULT_MAX_SIDE = 768
VTEST_EVAL_RANGE = (500, 795)
# Licence notes from shared/data/README.md: these may not be redistributed (no crops in committed reports).
_NOT_REDISTRIBUTABLE = {"motorcycle_left.png"}


@dataclass
class EvalImage:
    name: str                      # unique within a run, e.g. "photos-eval/chelsea" or "vtest/f0500"
    image: np.ndarray              # HxWx3 uint8 RGB
    source: str                    # path (and frame) it came from
    set: str
    redistributable: bool          # may crops of it go into a committed report
    boxes: list[list[int]] = field(default_factory=list)   # ROIs, (x0, y0, x1, y1)

    @property
    def pixels(self) -> int:
        return int(self.image.shape[0] * self.image.shape[1])


def data_root() -> Path:
    """$MRIDC_DATA, else ../shared/data beside the checkout (one rule, in mridc.shared.zoo)."""
    from mridc.shared.zoo import default_shared_data_dir

    return default_shared_data_dir()


def fit_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_folder(folder: str | os.PathLike, set_name: str | None = None, max_side: int = DEFAULT_MAX_SIDE,
                 redistributable: bool = True, exclude: Iterable[str] = ()) -> list[EvalImage]:
    """Every image in a folder, sorted by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    set_name = set_name or folder.name
    rois = json.loads((folder / "rois.json").read_text()) if (folder / "rois.json").is_file() else {}
    skip = set(exclude)
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name in skip:
            continue
        original = load_rgb(path)
        image = fit_max_side(original, max_side)
        scale = image.shape[1] / original.shape[1]
        boxes = [[round(v * scale) for v in box] for box in rois.get(path.name, [])]
        out.append(EvalImage(f"{set_name}/{path.stem}", image, str(path), set_name,
                             redistributable and path.name not in _NOT_REDISTRIBUTABLE, boxes))
    return out


def photos_eval(root: str | os.PathLike | None = None, max_side: int = DEFAULT_MAX_SIDE,
                include_unclear_licence: bool = True) -> list[EvalImage]:
    folder = Path(root) if root else data_root() / "photos" / "eval"
    exclude = () if include_unclear_licence else _NOT_REDISTRIBUTABLE
    return image_folder(folder, "photos-eval", max_side, exclude=exclude)


def kodak_tid2013(root: str | os.PathLike | None = None, max_side: int = 0) -> list[EvalImage]:
    folder = Path(root) if root else data_root() / "photos" / "eval_kodak_tid2013"
    return image_folder(folder, "kodak", max_side, redistributable=False)


def video_frames(path: str | os.PathLike, start: int = 0, stop: int | None = None, stride: int = 1,
                 max_side: int = 0, set_name: str | None = None, redistributable: bool = False,
                 motion_boxes: bool = False, background_frames: Sequence[int] = ()) -> list[EvalImage]:
    """Frames ``start, start + stride, ... < stop`` of a video (OpenCV), RGB."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        stop = total if stop is None else min(stop, total)
        wanted = list(range(start, stop, max(1, stride)))
        frames = _read_frames(cap, wanted)
        background = None
        if motion_boxes:
            background = np.median(np.stack(list(_read_frames(cap, background_frames).values())), axis=0)
    finally:
        cap.release()
    set_name = set_name or path.stem
    out = []
    for index in wanted:
        if index not in frames:
            continue
        rgb = frames[index]
        boxes = _motion_boxes(rgb, background) if background is not None else []
        image = fit_max_side(rgb, max_side)
        scale = image.shape[1] / rgb.shape[1]
        out.append(EvalImage(f"{set_name}/f{index:04d}", image, f"{path}#frame={index}", set_name,
                             redistributable, [[round(v * scale) for v in b] for b in boxes]))
    return out


def _read_frames(cap, indices: Sequence[int]) -> dict[int, np.ndarray]:
    import cv2

    frames = {}
    for index in sorted(set(indices)):
        # Sequential reads are exact for MJPG/AVI; seeking is used only to jump forward.
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, bgr = cap.read()
        if ok:
            frames[index] = np.ascontiguousarray(bgr[..., ::-1])
    return frames


def _motion_boxes(rgb: np.ndarray, background: np.ndarray, min_area: int = 300) -> list[list[int]]:
    """Boxes around what differs from the static background (people on a fixed camera)."""
    import cv2

    diff = np.abs(rgb.astype(np.int16) - background.astype(np.int16)).max(axis=2).astype(np.uint8)
    mask = (diff > 40).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    mask = cv2.dilate(mask, np.ones((9, 9), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    boxes = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            boxes.append([x, y, x + w, y + h])
    return boxes


def vtest(path: str | os.PathLike | None = None, stride: int = 30, start: int = VTEST_EVAL_RANGE[0],
          stop: int = VTEST_EVAL_RANGE[1], max_side: int = 0, motion_boxes: bool = True) -> list[EvalImage]:
    """Evaluation frames of the surveillance clip (never the training frames 0-499)."""
    if start < VTEST_EVAL_RANGE[0]:
        raise ValueError(f"vtest frames below {VTEST_EVAL_RANGE[0]} are training frames")
    video = Path(path) if path else data_root() / "camera" / "vtest.avi"
    return video_frames(video, start, stop, stride, max_side, "vtest", False, motion_boxes,
                        background_frames=range(0, VTEST_EVAL_RANGE[0], 25))


NAMED_SETS = {"photos-eval": photos_eval, "kodak": kodak_tid2013, "vtest": vtest}


def resolve(specs: Sequence[str], max_side: int = DEFAULT_MAX_SIDE, vtest_stride: int = 30,
            limit: int | None = None) -> list[EvalImage]:
    """Set names, folders, image files or video files -> one list of images (names made unique)."""
    images: list[EvalImage] = []
    for spec in specs:
        path = Path(spec)
        if spec == "photos-eval":
            images += photos_eval(max_side=max_side)
        elif spec == "kodak":
            images += kodak_tid2013()
        elif spec == "vtest":
            images += vtest(stride=vtest_stride)
        elif path.is_dir():
            images += image_folder(path, max_side=max_side)
        elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            images += video_frames(path, stride=vtest_stride, max_side=max_side)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(EvalImage(f"{path.parent.name}/{path.stem}", fit_max_side(load_rgb(path), max_side),
                                    str(path), path.parent.name, True))
        else:
            raise FileNotFoundError(f"{spec!r} is not a set name ({', '.join(NAMED_SETS)}), folder, image or video")
    seen: dict[str, int] = {}
    for item in images:
        if item.name in seen:
            seen[item.name] += 1
            item.name = f"{item.name}~{seen[item.name]}"
        else:
            seen[item.name] = 0
    return images[:limit] if limit else images
