"""What the ablation parts share: the image framing, the figure whitelist, summary and table helpers, JSON
cleaning and the masked-token view. ``ablation`` (the subcommand) imports the parts
(``ablation_mlm``, ``ablation_bpcg``) and they import only this module, so there is no import cycle."""

from __future__ import annotations

import math

import numpy as np

FIGURE_IMAGES = ("astronaut", "chelsea", "coffee")  # public domain / CC0: fine in a committed figure
TARGET_SIZE = (768, 512)  # width, height of a landscape frame (portrait: swapped)


# ---- images -----------------------------------------------------------------------------------------
def fit_frame(image: np.ndarray, size: tuple[int, int] = TARGET_SIZE) -> np.ndarray:
    """Centre-crop to the target aspect and resize to it (768x512, or 512x768 for portrait); keep if smaller."""
    from PIL import Image

    h, w = image.shape[:2]
    tw, th = size if w >= h else size[::-1]
    if w <= tw and h <= th:
        return image
    aspect = tw / th
    if w / h > aspect:
        cw, ch = round(h * aspect), h
    else:
        cw, ch = w, round(w / aspect)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    crop = image[y0:y0 + ch, x0:x0 + cw]
    if cw <= tw and ch <= th:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((tw, th), Image.Resampling.LANCZOS))


def masked_view(image: np.ndarray, keep: np.ndarray, stride: int, grey: int = 128) -> np.ndarray:
    """``image`` with the pixels of masked tokens set to grey (cropped to the image)."""
    h, w = image.shape[:2]
    up = np.repeat(np.repeat(keep, stride, axis=0), stride, axis=1)[:h, :w]
    out = image.copy()
    out[~up] = grey
    return out


# ---- summaries ---------------------------------------------------------------------------------------
def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def count_of(rows: list[dict], key: str) -> int:
    return sum(1 for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finite(obj):
    """JSON-safe copy: numpy scalars to Python, inf/nan to None."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    return obj
