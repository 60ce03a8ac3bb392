"""Classical codecs under a bit budget, searched the way a careful user would at 0.01-0.05 bpp.

Every codec follows one protocol::

    payload, decoded, info = codec.encode(image_rgb_uint8, budget_bits)

``payload`` is the exact bytes a receiver needs, ``decoded`` the HxWx3 uint8 image it reconstructs at the
original size, ``info`` a JSON-ready dict (``bits``, ``bpp`` per original pixel, settings chosen). When no
setting fits the budget, ``encode`` raises ``BudgetTooSmall``.

For JPEG, WebP, AVIF and JPEG XL (``ClassicalCodec``), the search runs over downscale factors and, at each
factor, bisects the quality for the largest file under the budget; the factor with the best PSNR (or
MS-SSIM, ``select=``) at the original size wins. Downscaled images are encoded small and upscaled with
Lanczos on decode. Bytes are counted honestly:

- files are written without ICC/EXIF/XMP (Pillow only writes metadata it is given, and we give none);
- a downscaled payload carries the original width and height (4 bytes, big-endian u16 each) after the
  file, since the receiver needs them to upscale; a full-size payload is the plain file;
- the container (JFIF/RIFF/HEIF/JXL codestream headers) counts: at 0.01 bpp on 512x384 the budget is
  245 bytes, and a HEIF container alone takes about 300 of them.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from .metrics import ms_ssim, psnr

# Downscale factors tried (1 / scale); denser near 1 where most of the choice happens at higher rates.
DEFAULT_FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
SIZE_TRAILER = struct.Struct(">HH")


class BudgetTooSmall(ValueError):
    """No setting of this codec fits the bit budget."""


@runtime_checkable
class Codec(Protocol):
    name: str

    def encode(self, image: np.ndarray, budget_bits: int) -> tuple[bytes, np.ndarray, dict]: ...


@dataclass
class _Candidate:
    factor: float
    quality: int
    file: bytes
    payload: bytes
    decoded: np.ndarray | None = None
    score: float | None = None


@dataclass
class ClassicalCodec:
    """A Pillow-backed codec: ``save_kwargs(quality)`` maps an integer quality to Pillow save options."""

    name: str
    pil_format: str
    quality_range: tuple[int, int]
    save_kwargs: Callable[[int], dict]
    factors: tuple[float, ...] = DEFAULT_FACTORS
    select: str = "psnr"
    label: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- single encodes -------------------------------------------------------------------------------
    def encode_file(self, image: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=self.pil_format, **self.save_kwargs(quality))
        return buf.getvalue()

    @staticmethod
    def decode_file(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def decode(self, payload: bytes) -> np.ndarray:
        """Decode a payload made by ``encode``: a plain file, or a smaller file + original-size trailer.

        A trailer form is recognised when the bytes before the last four decode to an image smaller than
        the size the last four bytes give; a plain file cut by four bytes fails to decode (truncated).
        """
        if len(payload) > SIZE_TRAILER.size:
            width, height = SIZE_TRAILER.unpack(payload[-SIZE_TRAILER.size:])
            try:
                small = self.decode_file(payload[: -SIZE_TRAILER.size])
            except (OSError, ValueError, RuntimeError, SyntaxError):  # not a cut file: a plain one
                small = None
            if small is not None and small.shape[1] <= width and small.shape[0] <= height \
                    and small.shape[:2] != (height, width):
                return upscale(small, width, height)
        return self.decode_file(payload)

    # ---- budgeted search ------------------------------------------------------------------------------
    def _encode_cached(self, image: np.ndarray, small: np.ndarray, factor: float, quality: int) -> bytes:
        key = (id(image), image.shape, factor, quality)
        if key not in self._cache:
            self._cache[key] = self.encode_file(small, quality)
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    def candidates(self, image: np.ndarray, budget_bits: int) -> list[_Candidate]:
        """For each downscale factor, the highest quality whose payload fits ``budget_bits``."""
        height, width = image.shape[:2]
        out = []
        for factor in self.factors:
            sw, sh = max(1, round(width / factor)), max(1, round(height / factor))
            if factor != 1.0 and (sw, sh) == (width, height):
                continue
            small = image if factor == 1.0 else downscale(image, sw, sh)
            trailer = b"" if factor == 1.0 else SIZE_TRAILER.pack(width, height)
            lo, hi = self.quality_range
            best = None
            while lo <= hi:  # file size grows with quality (near enough): bisect for the largest that fits
                mid = (lo + hi) // 2
                data = self._encode_cached(image, small, factor, mid)
                if (len(data) + len(trailer)) * 8 <= budget_bits:
                    best = _Candidate(factor, mid, data, data + trailer)
                    lo = mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                out.append(best)
        return out

    def encode(self, image: np.ndarray, budget_bits: int) -> tuple[bytes, np.ndarray, dict]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        found = self.candidates(image, budget_bits)
        if not found:
            raise BudgetTooSmall(f"{self.name}: no quality/downscale setting fits {budget_bits} bits "
                                 f"({budget_bits / (width * height):.4f} bpp) at {width}x{height}")
        scorer = psnr if self.select == "psnr" else ms_ssim
        for cand in found:
            small = self.decode_file(cand.file)
            cand.decoded = small if cand.factor == 1.0 else upscale(small, width, height)
            cand.score = scorer(image, cand.decoded)
        best = max(found, key=lambda c: c.score)
        bits = len(best.payload) * 8
        info = {
            "codec": self.name, "label": self.label or self.name,
            "bits": bits, "bytes": len(best.payload), "bpp": bits / (width * height),
            "budget_bits": int(budget_bits), "target_bpp": budget_bits / (width * height),
            "quality": best.quality, "downscale": best.factor,
            "coded_size": list(Image.open(io.BytesIO(best.file)).size),
            "original_size": [width, height], "select": self.select,
            "tried": [{"downscale": c.factor, "quality": c.quality, "bytes": len(c.payload), self.select: c.score}
                      for c in found],
        }
        return best.payload, best.decoded, info


def downscale(image: np.ndarray, width: int, height: int) -> np.ndarray:
    # Pillow's Lanczos filter is area-aware when shrinking, so this does not alias.
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def upscale(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


# ---- the four codecs ---------------------------------------------------------------------------------
def jpeg(**kw) -> ClassicalCodec:
    # optimize=True: per-image Huffman tables, much smaller than the default ones at these sizes.
    return ClassicalCodec("jpeg", "JPEG", (1, 95), lambda q: {"quality": q, "optimize": True, "subsampling": 2},
                          label="JPEG (libjpeg via Pillow, 4:2:0, optimized Huffman)", **kw)


def webp(method: int = 6, **kw) -> ClassicalCodec:
    return ClassicalCodec("webp", "WEBP", (0, 100), lambda q: {"quality": q, "method": method},
                          label=f"WebP (libwebp via Pillow, method {method})", **kw)


def avif(speed: int = 6, **kw) -> ClassicalCodec:
    return ClassicalCodec("avif", "AVIF", (0, 100),
                          lambda q: {"quality": q, "speed": speed, "subsampling": "4:2:0", "max_threads": 1},
                          label=f"AVIF (libavif via Pillow, speed {speed}, 4:2:0)", **kw)


def jxl(effort: int = 7, **kw) -> ClassicalCodec:
    import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)

    return ClassicalCodec("jxl", "JXL", (0, 99),
                          lambda q: {"quality": q, "effort": effort, "num_threads": 1, "lossless_jpeg": False},
                          label=f"JPEG XL (libjxl via pillow-jxl-plugin, effort {effort})", **kw)


CLASSICAL = {"jpeg": jpeg, "webp": webp, "avif": avif, "jxl": jxl}


def availability(name: str) -> str | None:
    """None if the codec can run here, else a one-line reason."""
    from PIL import features

    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401
        except ImportError:
            return "JPEG XL skipped: pillow-jxl-plugin is not installed (pip install pillow-jxl-plugin)"
        return None
    feature = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}.get(name)
    if feature is None:
        return f"unknown classical codec {name!r}; known: {', '.join(CLASSICAL)}"
    if not features.check(feature):
        return f"{name} skipped: this Pillow build has no {feature} support"
    return None


def make_codec(name: str, **kw) -> ClassicalCodec:
    reason = availability(name)
    if reason:
        raise RuntimeError(reason)
    return CLASSICAL[name](**kw)
