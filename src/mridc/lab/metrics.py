"""Full-reference fidelity metrics on uint8 RGB images: PSNR, MS-SSIM, and both inside boxes (ROIs).

All functions take ``HxWx3`` uint8 arrays of the same shape (reference first) and return plain floats,
so results serialise to JSON as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A box is (x0, y0, x1, y1) in pixels, x1/y1 exclusive, the convention of OpenCV rectangles and PIL crops.
Box = tuple[int, int, int, int]

_MSSSIM_WIN = 11


def _check_pair(ref: np.ndarray, dec: np.ndarray) -> None:
    if ref.shape != dec.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs decoded {dec.shape}")
    if ref.dtype != np.uint8 or dec.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {ref.dtype} and {dec.dtype}")


def mse(ref: np.ndarray, dec: np.ndarray) -> float:
    _check_pair(ref, dec)
    diff = ref.astype(np.float64) - dec.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(ref: np.ndarray, dec: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB over all pixels and channels (RGB, 8-bit peak). Identical images give ``inf``."""
    err = mse(ref, dec)
    if err == 0.0:
        return math.inf
    return float(10.0 * math.log10(peak * peak / err))


def ms_ssim(ref: np.ndarray, dec: np.ndarray) -> float:
    """MS-SSIM (pytorch-msssim: 5 scales, standard weights, Gaussian window 11, data range 255, RGB mean).

    pytorch-msssim needs a short side above 160 px for the 11-px window. Smaller images (ROI crops) use the
    largest odd window that fits (>= 3), and below 33 px plain SSIM; ``ms_ssim_window`` tells which. Such
    values are comparable to each other (same crop, other codec), not to full-image MS-SSIM.
    """
    _check_pair(ref, dec)
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim
    from pytorch_msssim import ssim as _ssim

    x = torch.from_numpy(np.array(ref, dtype=np.float32)).permute(2, 0, 1)[None]
    y = torch.from_numpy(np.array(dec, dtype=np.float32)).permute(2, 0, 1)[None]
    win = ms_ssim_window(ref.shape[0], ref.shape[1])
    with torch.no_grad():
        if win is not None:
            value = _ms_ssim(x, y, data_range=255.0, size_average=True, win_size=win)
        else:
            short = min(ref.shape[0], ref.shape[1])
            value = _ssim(x, y, data_range=255.0, size_average=True,
                          win_size=max(1, min(_MSSSIM_WIN, short) // 2 * 2 - 1))
    return float(value)


def ms_ssim_window(height: int, width: int) -> int | None:
    """The Gaussian window MS-SSIM uses at this size (pytorch-msssim needs short side > (win - 1) * 16),
    or None when even a 3-px window does not fit and plain SSIM is used."""
    short = min(height, width)
    for win in range(_MSSSIM_WIN, 2, -2):
        if short > (win - 1) * 16:
            return win
    return None


def clip_box(box: Sequence[int], height: int, width: int) -> Box | None:
    """The box clipped to the image, or None if nothing of it is inside."""
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def roi_metrics(ref: np.ndarray, dec: np.ndarray, boxes: Sequence[Sequence[int]]) -> dict:
    """Fidelity inside key regions.

    Returns ``{"roi_psnr": pooled PSNR over the union of the boxes, "roi_psnr_mean": mean of per-box PSNRs,
    "roi_ms_ssim_mean": mean per-box (MS-)SSIM, "outside_psnr": PSNR of everything outside the boxes,
    "roi_fraction": share of pixels inside, "boxes": [per-box dicts]}``. With no valid box every value is
    None, so a caller can tell "no ROI" from "bad ROI".
    """
    _check_pair(ref, dec)
    height, width = ref.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    per_box = []
    for box in boxes:
        clipped = clip_box(box, height, width)
        if clipped is None:
            continue
        x0, y0, x1, y1 = clipped
        mask[y0:y1, x0:x1] = True
        crop_ref, crop_dec = ref[y0:y1, x0:x1], dec[y0:y1, x0:x1]
        per_box.append({"box": list(clipped), "psnr": psnr(crop_ref, crop_dec), "ms_ssim": ms_ssim(crop_ref, crop_dec)})
    if not per_box:
        return {"roi_psnr": None, "roi_psnr_mean": None, "roi_ms_ssim_mean": None, "outside_psnr": None,
                "roi_fraction": 0.0, "boxes": []}
    return {
        "roi_psnr": masked_psnr(ref, dec, mask),
        "roi_psnr_mean": float(np.mean([b["psnr"] for b in per_box])),
        "roi_ms_ssim_mean": float(np.mean([b["ms_ssim"] for b in per_box])),
        "outside_psnr": masked_psnr(ref, dec, ~mask) if (~mask).any() else None,
        "roi_fraction": float(mask.mean()),
        "boxes": per_box,
    }


def masked_psnr(ref: np.ndarray, dec: np.ndarray, mask: np.ndarray, peak: float = 255.0) -> float:
    """PSNR over the pixels where ``mask`` (HxW bool) is True."""
    _check_pair(ref, dec)
    if mask.shape != ref.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {ref.shape[:2]}")
    if not mask.any():
        raise ValueError("empty mask")
    diff = ref[mask].astype(np.float64) - dec[mask].astype(np.float64)
    err = float(np.mean(diff * diff))
    return math.inf if err == 0.0 else float(10.0 * math.log10(peak * peak / err))
