"""NIQE, the no-reference naturalness score (Mittal, Soundararajan, Bovik 2013). Lower is more natural.

This follows the reference MATLAB code as ported by basicsr (``basicsr/metrics/niqe.py``): luma (BT.601 Y,
rounded), 96x96 blocks, MSCN coefficients with a 7x7 Gaussian window, 18 AGGD features per block at full
and half scale (half scale by MATLAB-style antialiased bicubic ``imresize``), then the Mahalanobis-like
distance between the image's multivariate Gaussian fit and the pristine model. The pristine parameters
(``niqe_pris_params.npz``: ``mu_pris_param``, ``cov_pris_param``, ``gaussian_window``) are basicsr's copy of
the MATLAB model, read from ``../shared/data/weights/niqe/`` or ``$MRIDC_NIQE_PARAMS``.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma

from mridc.shared.zoo import default_shared_data_dir

PARAMS_ENV = "MRIDC_NIQE_PARAMS"
BLOCK = 96

_GAM = np.arange(0.2, 10.001, 0.001)
_R_GAM = gamma(2.0 / _GAM) ** 2 / (gamma(1.0 / _GAM) * gamma(3.0 / _GAM))


def default_params_path() -> Path:
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    return default_shared_data_dir() / "weights" / "niqe" / "niqe_pris_params.npz"


@lru_cache(maxsize=4)
def load_pristine(path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (36,), cov (36, 36), gaussian window (7, 7)) of the pristine model."""
    p = Path(path) if path else default_params_path()
    if not p.is_file():
        raise FileNotFoundError(f"NIQE pristine parameters not found at {p}; pass params=PATH or set ${PARAMS_ENV}")
    data = np.load(p)
    return data["mu_pris_param"].reshape(-1), data["cov_pris_param"], data["gaussian_window"]


def _aggd(block: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (alpha, beta_left, beta_right)."""
    v = block.ravel()
    negative, positive = v[v < 0], v[v > 0]
    if negative.size == 0 or positive.size == 0:  # a flat block: no fit; dropped by nanmean below
        return math.nan, math.nan, math.nan
    left_std = math.sqrt(np.mean(negative ** 2))
    right_std = math.sqrt(np.mean(positive ** 2))
    gammahat = left_std / right_std
    rhat = np.mean(np.abs(v)) ** 2 / np.mean(v ** 2)
    rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
    alpha = float(_GAM[np.argmin((_R_GAM - rhatnorm) ** 2)])
    ratio = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left_std * ratio, right_std * ratio


def _block_features(block: np.ndarray) -> list[float]:
    alpha, beta_l, beta_r = _aggd(block)
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, beta_l, beta_r = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = math.nan if math.isnan(alpha) else (beta_r - beta_l) * gamma(2 / alpha) / gamma(1 / alpha)
        feats += [alpha, mean, beta_l, beta_r]
    return feats


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_axis(img: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """MATLAB ``imresize(..., 'bicubic')`` along one axis, antialiased when shrinking."""
    in_len = img.shape[axis]
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]            # 1-based, as in MATLAB
    dist = u[:, None] - idx
    weights = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx0 = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    moved = np.moveaxis(img, axis, 0)
    out = np.einsum("ot,ot...->o...", weights, moved[idx0])
    return np.moveaxis(out, 0, axis)


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    return _resize_axis(_resize_axis(img.astype(np.float64), scale, 0), scale, 1)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235], as MATLAB ``rgb2ycbcr`` (and basicsr's ``to_y_channel``)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def niqe_gray(img: np.ndarray, params: str | None = None) -> float:
    """NIQE of a 2-D float image in [0, 255]; needs at least 2x2 blocks of 96 px (192x192)."""
    mu_pris, cov_pris, window = load_pristine(params)
    h, w = img.shape
    nbh, nbw = h // BLOCK, w // BLOCK
    if nbh * nbw < 2:
        raise ValueError(f"NIQE needs an image of at least 96x192 px, got {w}x{h}")
    img = img[: nbh * BLOCK, : nbw * BLOCK].astype(np.float64)
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, window, mode="nearest") - mu * mu))
        mscn = (img - mu) / (sigma + 1)
        size = BLOCK // scale
        feats = [_block_features(mscn[bh * size:(bh + 1) * size, bw * size:(bw + 1) * size])
                 for bw in range(nbw) for bh in range(nbh)]
        per_scale.append(np.array(feats))
        if scale == 1:
            img = imresize_matlab(img / 255.0, 0.5) * 255.0
    dist = np.concatenate(per_scale, axis=1)
    mu_dist = np.nanmean(dist, axis=0)
    cov_dist = np.cov(dist[~np.isnan(dist).any(axis=1)], rowvar=False)
    diff = mu_pris - mu_dist
    return float(np.sqrt(diff @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ diff))


def niqe(image: np.ndarray, params: str | None = None, crop_border: int = 0) -> float:
    """NIQE of an HxWx3 uint8 RGB (or HxW gray uint8) image. Lower is more natural."""
    y = rgb_to_y(image) if image.ndim == 3 else image.astype(np.float64)
    y = np.round(y)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    return niqe_gray(y, params)
