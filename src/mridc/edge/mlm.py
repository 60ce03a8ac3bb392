"""Map-guided latent masking (MLM): which tokens of the grid are sent, under an exact byte budget.

1. `priority_map` scores every token from cheap per-token signals, combined with `MaskingConfig` weights:
   texture (mean luma gradient of the token's pixels), the tokenizer's quantisation error, how much the
   token differs from its neighbours (a token equal to its neighbours is easy for the cloud to predict),
   key regions, and any extra named maps (a motion map, say).
2. `selection_order` ranks the tokens: key-region tokens first, then one anchor per
   `anchor_spacing` x `anchor_spacing` block (that block's best token, so no large region goes all
   masked), then the rest, each tier by falling priority. Ties fall to an ordered-dither rank, which
   spreads tied tokens evenly over the grid. Keeping n tokens keeps the first n of that order.
3. `fit_to_budget` searches the keep count whose real coded stream (the caller's `pack`) is the largest
   that fits the byte budget; `select_keep_mask` takes a count directly (the keep-ratio mode).

Images: the encoder pads a frame to a multiple of the stride by edge replication (bottom and right)
and crops after decoding; `pad_to_grid` is that padding, and `priority_map` applies it to an unpadded
frame itself, so both padded and unpadded frames give the same map.

No torch here: this runs on the camera.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from mridc.shared import protocol

GridShape = tuple[int, int]
PackFn = Callable[[np.ndarray], bytes]


@dataclass(frozen=True)
class MaskingConfig:
    """Weights of the priority sources and the selection policy (plain data; see `from_dict`)."""

    texture_weight: float = 1.0  # mean luma gradient magnitude of the token's pixels
    quant_error_weight: float = 0.5  # tokenizer's distance to the chosen codeword
    neighbour_weight: float = 0.5  # fraction of the 8 neighbours holding a different token
    key_weight: float = 1.0  # key regions (they are also kept first, whatever their weight)
    extra_weights: Mapping[str, float] = field(default_factory=dict)  # extra maps by name; 1.0 if absent
    normalise_percentile: float = 95.0  # each source is divided by this percentile, then clipped to 1
    anchor_spacing: int = 4  # one anchor per s x s block of tokens; 0 turns anchors off
    protect_key_regions: bool = True  # keep key-region tokens before anything else
    token_bits_guess: float = 10.0  # bits per kept token for the first size estimate (log2 codebook)
    header_bytes_guess: float = 24.0  # fixed stream overhead for the first size estimate
    mask_bits_factor: float = 0.7  # mask cost as a fraction of its iid entropy, first estimate only
    max_pack_calls: int = 32  # safety bound on the rate search

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown masking config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["extra_weights"] = dict(self.extra_weights)
        return out


# --------------------------------------------------------------------------- priority map


def pad_to_grid(image: np.ndarray, grid_shape: GridShape, stride: int) -> np.ndarray:
    """Pad `image` (H, W[, C]) by edge replication at the bottom and right to the grid's pixel size."""
    gh, gw = grid_shape
    h, w = image.shape[:2]
    ph, pw = gh * stride - h, gw * stride - w
    if ph < 0 or pw < 0 or ph >= stride or pw >= stride:
        raise ValueError(
            f"image {h}x{w} does not match grid {gh}x{gw} at stride {stride} "
            f"(expected ceil(size / stride) tokens per side)"
        )
    if ph == 0 and pw == 0:
        return image
    return cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_REPLICATE)


def grid_shape_for(height: int, width: int, stride: int) -> GridShape:
    """Token grid of a frame padded up to a multiple of `stride`."""
    return protocol.grid_shape(width, height, stride)


def _normalise(values: np.ndarray, percentile: float) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    if scale <= 0.0:
        scale = float(values.max()) if values.size else 0.0
    if scale <= 0.0:
        return np.zeros_like(values)
    return np.minimum(values / np.float32(scale), np.float32(1.0))


def texture_energy(image_rgb: np.ndarray, grid_shape: GridShape, stride: int) -> np.ndarray:
    """Mean luma gradient magnitude per token, float32 (gh, gw), on the padded frame.

    Measured at half resolution (Sobel on uint8, 8x8 samples per 16x16 token): a tenth of the
    full-resolution cost, and the ranking of tokens it gives is what matters here."""
    padded = pad_to_grid(image_rgb, grid_shape, stride)
    luma = (
        padded
        if padded.ndim == 2
        else cv2.cvtColor(np.ascontiguousarray(padded[..., :3]), cv2.COLOR_RGB2GRAY)
    )
    gh, gw = grid_shape
    if stride >= 4 and stride % 2 == 0:
        luma = cv2.resize(luma, (gw * stride // 2, gh * stride // 2), interpolation=cv2.INTER_AREA)
    # |Sobel| <= 1020 on uint8; a quarter of it fits uint8 without saturating.
    gx = cv2.convertScaleAbs(cv2.Sobel(luma, cv2.CV_16S, 1, 0, ksize=3), alpha=0.25)
    gy = cv2.convertScaleAbs(cv2.Sobel(luma, cv2.CV_16S, 0, 1, ksize=3), alpha=0.25)
    magnitude = cv2.add(gx, gy)
    return cv2.resize(magnitude, (gw, gh), interpolation=cv2.INTER_AREA).astype(np.float32)


def neighbour_difference(tokens: np.ndarray) -> np.ndarray:
    """Fraction of each token's 8 neighbours (inside the grid) holding a different index, float32."""
    tokens = np.asarray(tokens)
    gh, gw = tokens.shape
    padded = np.pad(tokens.astype(np.int64), 1, constant_values=-1)
    differ = np.zeros((gh, gw), np.float32)
    present = np.zeros((gh, gw), np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = padded[1 + dy : 1 + dy + gh, 1 + dx : 1 + dx + gw]
            inside = nb >= 0
            present += inside
            differ += inside & (nb != tokens)
    return np.divide(differ, present, out=np.zeros_like(differ), where=present > 0)


def priority_map(
    image_rgb_uint8: np.ndarray,
    grid_shape: GridShape,
    stride: int,
    *,
    quant_error: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    key_mask: np.ndarray | None = None,
    extra_maps: Mapping[str, np.ndarray] | None = None,
    config: MaskingConfig | None = None,
) -> np.ndarray:
    """Per-token priority, float32 (gh, gw), higher = keep first. Sources that are None are skipped."""
    config = config or MaskingConfig()
    gh, gw = grid_shape
    priority = np.zeros((gh, gw), np.float32)

    def add(weight: float, values: np.ndarray | None, name: str, normalise: bool = True) -> None:
        if values is None or weight == 0.0:
            return
        values = np.asarray(values)
        if values.shape != (gh, gw):
            raise ValueError(f"{name} has shape {values.shape}, expected the grid {(gh, gw)}")
        source = _normalise(values, config.normalise_percentile) if normalise else values.astype(np.float32)
        np.add(priority, np.float32(weight) * source, out=priority)

    if config.texture_weight:
        add(config.texture_weight, texture_energy(image_rgb_uint8, grid_shape, stride), "texture")
    add(config.quant_error_weight, quant_error, "quant_error")
    if tokens is not None and config.neighbour_weight:
        add(config.neighbour_weight, neighbour_difference(tokens), "tokens", normalise=False)
    add(config.key_weight, key_mask, "key_mask", normalise=False)
    for name, values in sorted((extra_maps or {}).items()):
        add(config.extra_weights.get(name, 1.0), values, name)
    return priority


# --------------------------------------------------------------------------- selection


def _dither_rank(grid_shape: GridShape) -> np.ndarray:
    """int64 (gh, gw): an ordered-dither (Bayer) rank; any prefix of it is spread evenly over the grid."""
    gh, gw = grid_shape
    bits = max(1, math.ceil(math.log2(max(gh, gw, 2))))
    ys, xs = np.mgrid[0:gh, 0:gw]
    rank = np.zeros((gh, gw), np.int64)
    for b in range(bits):
        y, x = (ys >> b) & 1, (xs >> b) & 1
        # Bayer index: interleave (x ^ y, y), lowest bit most significant.
        rank |= ((x ^ y) << (2 * (bits - 1 - b) + 1)) | (y << (2 * (bits - 1 - b)))
    return rank


def anchor_mask(priority: np.ndarray, spacing: int) -> np.ndarray:
    """Bool (gh, gw): the best token (priority, then dither) of each spacing x spacing block."""
    gh, gw = priority.shape
    anchors = np.zeros((gh, gw), bool)
    if spacing <= 0:
        return anchors
    dither = _dither_rank((gh, gw))
    order = np.lexsort((dither.ravel(), -priority.ravel()))  # best first
    block = (np.arange(gh)[:, None] // spacing) * (-(-gw // spacing)) + np.arange(gw)[None, :] // spacing
    block_of = block.ravel()[order]
    _, first = np.unique(block_of, return_index=True)
    anchors.ravel()[order[first]] = True
    return anchors


def selection_order(priority: np.ndarray, key_mask: np.ndarray | None, config: MaskingConfig) -> np.ndarray:
    """Raster indices of all tokens, the order in which they are kept (see the module docstring)."""
    priority = np.asarray(priority, np.float32)
    tier = np.full(priority.shape, 2, np.int8)
    tier[anchor_mask(priority, config.anchor_spacing)] = 1
    if key_mask is not None and config.protect_key_regions:
        if key_mask.shape != priority.shape:
            raise ValueError(f"key_mask has shape {key_mask.shape}, expected {priority.shape}")
        tier[key_mask.astype(bool)] = 0
    dither = _dither_rank(priority.shape)
    return np.lexsort((dither.ravel(), -priority.ravel(), tier.ravel()))


def mask_from_order(order: np.ndarray, n_keep: int, grid_shape: GridShape) -> np.ndarray:
    keep = np.zeros(grid_shape[0] * grid_shape[1], bool)
    keep[order[:n_keep]] = True
    return keep.reshape(grid_shape)


def key_region_warning(n_keep: int, key_mask: np.ndarray | None, config: MaskingConfig) -> str | None:
    """The warning to show when keeping `n_keep` tokens masks key-region tokens (None when it does not)."""
    if key_mask is None or not config.protect_key_regions:
        return None
    n_key = int(np.count_nonzero(key_mask))
    if n_keep >= n_key:
        return None
    return (
        f"budget holds only {n_keep} of {n_key} key-region tokens: {n_key - n_keep} key tokens "
        f"(the lowest-priority ones) are masked; raise the budget or shrink the key regions"
    )


class KeepSelection(NamedTuple):
    keep_mask: np.ndarray  # bool (gh, gw)
    warning: str | None  # set when key-region tokens had to be masked; show it to the user


def select_keep_mask(
    priority: np.ndarray, n_keep: int, key_mask: np.ndarray | None = None, config: MaskingConfig | None = None
) -> KeepSelection:
    """Keep `n_keep` tokens: key regions first, then anchors, then by priority."""
    config = config or MaskingConfig()
    n_total = priority.size
    if not 0 <= n_keep <= n_total:
        raise ValueError(f"n_keep={n_keep} outside [0, {n_total}]")
    order = selection_order(priority, key_mask, config)
    return KeepSelection(
        mask_from_order(order, n_keep, priority.shape), key_region_warning(n_keep, key_mask, config)
    )


def keep_count_for_ratio(keep_ratio: float, n_tokens: int) -> int:
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} outside [0, 1]")
    return round(keep_ratio * n_tokens)


# --------------------------------------------------------------------------- rate control


def target_bytes_for_bpp(bpp: float, width: int, height: int) -> int:
    """Largest whole byte count whose rate over the original frame is at most `bpp`."""
    if bpp <= 0:
        raise ValueError(f"bpp must be positive, got {bpp}")
    return math.floor(bpp * width * height / 8.0 + 1e-9)


@dataclass
class RateInfo:
    n_keep: int
    n_tokens: int
    n_key: int
    target_bytes: int
    stream_bytes: int
    next_bytes: int | None  # coded size with one more token (None when all tokens fit)
    pack_calls: int
    warning: str | None

    @property
    def keep_ratio(self) -> float:
        return self.n_keep / self.n_tokens if self.n_tokens else 0.0


def _mask_bits(n: np.ndarray, n_total: int) -> np.ndarray:
    p = np.clip(n / max(n_total, 1), 1e-12, 1 - 1e-12)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((n == 0) | (n == n_total), 0.0, h * n_total)


class SearchSettings(Protocol):
    """The rate search's first size estimate and its bound (`MaskingConfig` has these fields)."""

    token_bits_guess: float
    header_bytes_guess: float
    mask_bits_factor: float
    max_pack_calls: int


def fit_order_to_budget(
    order: np.ndarray,
    grid: GridShape,
    target_bytes: int,
    pack: PackFn,
    settings: SearchSettings | None = None,
    *,
    token_bits: np.ndarray | None = None,
    start_keep: int | None = None,
) -> tuple[np.ndarray, bytes, RateInfo]:
    """The longest prefix of `order` (raster indices, best first) whose packed stream fits the budget.

    Sizes are measured by `pack(keep_mask) -> bytes`, never computed by formula. The result satisfies
    ``len(pack(mask_n)) <= target_bytes < len(pack(mask_n+1))`` (or n is all tokens): a bracketed
    search seeded by a size model (or `start_keep`, e.g. the previous frame's count), a handful of
    pack calls. `token_bits` (gh, gw), each token's code length under the shipped prior
    (``-log2(freq / 2**16)``), sharpens the model so that two or three calls usually suffice.
    The returned info has no key-region fields (n_key 0, no warning): the selection policy owns those.
    Raises ValueError when even the stream with no token kept is over the budget.
    """
    config = settings or MaskingConfig()
    n_total = grid[0] * grid[1]
    sizes: dict[int, bytes] = {}

    def size(n: int) -> int:
        if n not in sizes:
            if len(sizes) >= config.max_pack_calls:
                raise RuntimeError(f"rate search did not converge in {config.max_pack_calls} pack calls")
            sizes[n] = pack(mask_from_order(order, n, grid))
        return len(sizes[n])

    counts = np.arange(n_total + 1)
    if token_bits is None:
        per_token = np.full(n_total, config.token_bits_guess)
    else:
        if np.shape(token_bits) != tuple(grid):
            raise ValueError(f"token_bits shape {np.shape(token_bits)} differs from the grid {grid}")
        per_token = np.asarray(token_bits, np.float64).ravel()[order]
    model_bits = np.concatenate([[0.0], np.cumsum(per_token)])
    model_bits += config.mask_bits_factor * _mask_bits(counts, n_total)

    def guess(lo: int, hi: int) -> int:
        """Largest n in (lo, hi) that the size model, fitted to measured sizes, says fits."""
        if lo in sizes and hi in sizes:
            pair = [lo, hi]  # secant across the bracket
        else:
            pair = sorted(sizes, key=lambda m: abs(len(sizes[m]) - target_bytes))[:2]
        b = 1 / 8  # bytes per model bit
        if len(pair) == 2 and model_bits[pair[1]] != model_bits[pair[0]]:
            b = (len(sizes[pair[1]]) - len(sizes[pair[0]])) / (model_bits[pair[1]] - model_bits[pair[0]])
            b = b if b > 0 else 1 / 8
        a = len(sizes[pair[0]]) - b * model_bits[pair[0]] if pair else config.header_bytes_guess
        fits = np.flatnonzero(a + b * model_bits <= target_bytes)
        n = int(fits[-1]) if fits.size else 0
        return min(max(n, lo + 1), hi - 1)

    # Bracket: lo fits (-1: none known yet), hi does not (n_total + 1: none known yet).
    lo, hi = -1, n_total + 1
    n = guess(lo, hi) if start_keep is None else min(max(int(start_keep), 0), n_total)
    width, stalls = hi - lo, 0
    while True:
        if size(n) <= target_bytes:
            lo = n
        else:
            hi = n
        if hi - lo <= 1:
            break
        # The model usually lands within a token or two; when it does not halve the bracket twice
        # running, bisect, so the search stays logarithmic whatever the stream's size curve.
        stalls = stalls + 1 if hi - lo > width // 2 else 0
        width = hi - lo
        bounded = lo >= 0 and hi <= n_total
        # Within a few tokens, byte rounding makes the model's guess no better than the midpoint.
        n = (lo + hi) // 2 if bounded and (stalls >= 2 or hi - lo <= 8) else guess(lo, hi)
    if lo < 0:
        raise ValueError(
            f"budget of {target_bytes} bytes is below the smallest possible stream "
            f"({size(0)} bytes: header and mask with no token kept)"
        )
    info = RateInfo(
        n_keep=lo,
        n_tokens=n_total,
        n_key=0,
        target_bytes=target_bytes,
        stream_bytes=len(sizes[lo]),
        next_bytes=len(sizes[lo + 1]) if lo + 1 in sizes else None,
        pack_calls=len(sizes),
        warning=None,
    )
    return mask_from_order(order, lo, grid), sizes[lo], info


def fit_to_budget(
    tokens: np.ndarray | None,
    priority: np.ndarray,
    key_mask: np.ndarray | None,
    target_bytes: int,
    pack: PackFn,
    config: MaskingConfig | None = None,
    *,
    token_bits: np.ndarray | None = None,
    start_keep: int | None = None,
) -> tuple[np.ndarray, bytes, RateInfo]:
    """The keep mask with the most tokens (in `selection_order`) whose packed stream fits the budget
    (`fit_order_to_budget` over the map-guided order; the info says how many key tokens were masked)."""
    config = config or MaskingConfig()
    priority = np.asarray(priority)
    if tokens is not None and np.shape(tokens) != priority.shape:
        raise ValueError(f"tokens shape {np.shape(tokens)} differs from priority shape {priority.shape}")
    order = selection_order(priority, key_mask, config)
    keep, stream, info = fit_order_to_budget(order, priority.shape, target_bytes, pack, config,
                                             token_bits=token_bits, start_keep=start_keep)
    n_key = int(np.count_nonzero(key_mask)) if key_mask is not None else 0
    info = dataclasses.replace(info, n_key=n_key, warning=key_region_warning(info.n_keep, key_mask, config))
    return keep, stream, info


__all__ = [
    "KeepSelection",
    "MaskingConfig",
    "RateInfo",
    "SearchSettings",
    "anchor_mask",
    "fit_order_to_budget",
    "fit_to_budget",
    "grid_shape_for",
    "keep_count_for_ratio",
    "key_region_warning",
    "mask_from_order",
    "neighbour_difference",
    "pad_to_grid",
    "priority_map",
    "select_keep_mask",
    "selection_order",
    "target_bytes_for_bpp",
    "texture_energy",
]
