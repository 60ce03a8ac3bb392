"""Training images: high-resolution photos, small photos and frames of a static surveillance camera.

All images are held in memory as uint8 tensors (on the GPU when training there) and random crops at random
scales with flips are cut from them on the fly, so there are many thousands of distinct crops without a
data-loader process (this machine has 2 cores).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
    return files


def read_video_frames(path: Path, first: int, last: int, every: int = 1) -> list[np.ndarray]:
    """Frames first..last (every `every`-th) of a video, RGB uint8."""
    from mridc.cloud.corpus import read_video

    return [frame for _, frame in read_video(path, first, last, every)]


def parse_source(spec: str) -> list[np.ndarray]:
    """A folder or image file, or VIDEO[:FIRST-LAST[:EVERY]] for frames of a video."""
    path, _, rng = spec.partition(":")
    p = Path(path)
    if p.suffix.lower() in {".avi", ".mp4", ".mkv", ".mov"}:
        first, last, every = 0, 10**9, 1
        if rng:
            parts = rng.split(":")
            a, _, b = parts[0].partition("-")
            first, last = int(a), int(b)
            if len(parts) > 1:
                every = int(parts[1])
        return read_video_frames(p, first, last, every)
    out = []
    for f in list_images([p]):
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
    if not out:
        raise FileNotFoundError(f"no images in {spec}")
    return out


class CropSampler:
    """Random crops (size x size) at random scales with horizontal flips, as tensors in [-1, 1]."""

    def __init__(self, images: list[np.ndarray], size: int, device: torch.device, min_scale: float = 0.2,
                 max_side: int = 2560):
        self.size = size
        self.device = device
        self.min_scale = min_scale
        self.images = []
        for img in images:
            t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)
            h, w = t.shape[1:]
            if min(h, w) < size:  # small images are upscaled so that a crop fits
                f = size / min(h, w)
                t = F.interpolate(t[None].float(), size=(math.ceil(h * f), math.ceil(w * f)), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).byte()
            elif max(h, w) > max_side:  # keep memory in check; still 4+ MP of detail
                f = max_side / max(h, w)
                t = F.interpolate(t[None].float(), size=(int(h * f), int(w * f)), mode="area")[0].round().byte()
            self.images.append(t.to(device))
        # Sample images in proportion to their area so big photos give more crops.
        areas = np.array([t.shape[1] * t.shape[2] for t in self.images], dtype=np.float64)
        self.weights = (areas / areas.sum()) ** 0.5
        self.weights /= self.weights.sum()

    def sample(self, batch: int, rng: random.Random) -> torch.Tensor:
        out = []
        for _ in range(batch):
            img = self.images[rng.choices(range(len(self.images)), weights=self.weights)[0]]
            h, w = img.shape[1:]
            lo = max(self.min_scale, self.size / min(h, w))
            scale = math.exp(rng.uniform(math.log(lo), 0.0))  # crop covers size/scale source pixels
            side = min(round(self.size / scale), h, w)
            y, x = rng.randint(0, h - side), rng.randint(0, w - side)
            crop = img[:, y:y + side, x:x + side][None].float()
            if side != self.size:
                crop = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                                     align_corners=False)
            if rng.random() < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
        return (torch.cat(out) / 127.5 - 1.0).clamp(-1, 1)


def default_train_sources(shared: Path) -> list[str]:
    """The built corpus's train/ (`mridc-cloud data`; $MRIDC_CORPUS or data/corpus) when there is one, else the
    shared data folder's training photos and vtest frames 0-489."""
    from mridc.cloud.corpus import built_corpus

    corpus = built_corpus()
    if corpus is not None and list_images([corpus / "train"]):
        return [str(corpus / "train")]
    return shared_train_sources(shared)


def shared_train_sources(shared: Path) -> list[str]:
    """The shared data folder's original training split: what the shipped models and edge bundle were made from."""
    return [str(shared / "photos/train"), str(shared / "photos/train_small"),
            f"{shared / 'camera/vtest.avi'}:0-489"]


def default_val_sources(shared: Path) -> list[str]:
    from mridc.cloud.corpus import built_corpus

    corpus = built_corpus()
    if corpus is not None and list_images([corpus / "val"]):
        return [str(corpus / "val")]
    # vtest frames 490-499 are held out of training (the eval set, frames 500+, is never used here).
    return [f"{shared / 'camera/vtest.avi'}:490-499:3"]
