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

import functools
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
    coded_size: list[int] | None = None


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
            cand.coded_size = [small.shape[1], small.shape[0]]
            cand.decoded = small if cand.factor == 1.0 else upscale(small, width, height)
            cand.score = scorer(image, cand.decoded)
        best = max(found, key=lambda c: c.score)
        bits = len(best.payload) * 8
        info = {
            "codec": self.name, "label": self.label or self.name,
            "bits": bits, "bytes": len(best.payload), "bpp": bits / (width * height),
            "budget_bits": int(budget_bits), "target_bpp": budget_bits / (width * height),
            "quality": best.quality, "downscale": best.factor,
            "coded_size": best.coded_size,
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


class AvifObuCodec(ClassicalCodec):
    """AVIF with the HEIF container stripped: the payload is the AV1 bitstream (the ``mdat`` contents) plus
    the coded size (4 bytes). The receiver rebuilds the container from a template made with the same
    encoder settings, so the ~275 bytes of ``ftyp``/``meta`` boxes (0.011 bpp at 512x384) are not sent.
    This is what a careful user would ship at these rates; ``avif`` keeps the plain file for reference.
    """

    def encode_file(self, image: np.ndarray, quality: int) -> bytes:
        data = super().encode_file(image, quality)
        boxes = _top_level_boxes(data)
        if [name for name, _, _ in boxes][-1:] != [b"mdat"]:
            raise ValueError("unexpected AVIF layout: mdat is not the last box")
        _, start, end = boxes[-1]
        return SIZE_TRAILER.pack(image.shape[1], image.shape[0]) + data[start:end]

    def decode_file(self, data: bytes) -> np.ndarray:
        width, height = SIZE_TRAILER.unpack(data[: SIZE_TRAILER.size])
        return ClassicalCodec.decode_file(_avif_rewrap(data[SIZE_TRAILER.size:], width, height,
                                                       self.save_kwargs(0)))


def _top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each top-level ISO-BMFF box."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = len(data) - pos
        out.append((name, pos + header, pos + size))
        pos += size
    return out


@functools.lru_cache(maxsize=64)
def _avif_template(width: int, height: int, settings: tuple) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, format="AVIF", **dict(settings))
    return buf.getvalue()


def _avif_rewrap(av1: bytes, width: int, height: int, save_kwargs: dict) -> bytes:
    """A complete AVIF file around an AV1 still-image bitstream (one item, one extent, as libavif writes)."""
    settings = tuple(sorted((k, v) for k, v in save_kwargs.items() if k != "quality"))
    template = _avif_template(width, height, settings)
    boxes = _top_level_boxes(template)
    meta = next((start, end) for name, start, end in boxes if name == b"meta")
    mdat_start = boxes[-1][1]
    head = bytearray(template[: mdat_start - 8])
    iloc = head.find(b"iloc", meta[0], meta[1])
    version = head[iloc + 4]
    offset_size, length_size = head[iloc + 8] >> 4, head[iloc + 8] & 15
    base_offset_size = head[iloc + 9] >> 4
    pos = iloc + 10
    item_count = struct.unpack(">H", head[pos:pos + 2])[0]
    pos += 2 + 2 + (2 if version in (1, 2) else 0) + 2 + base_offset_size  # item id, method, data ref, base
    extent_count = struct.unpack(">H", head[pos:pos + 2])[0]
    if version > 1 or item_count != 1 or extent_count != 1 or length_size != 4:
        raise ValueError("unexpected AVIF template layout")
    pos += 2 + offset_size
    head[pos:pos + 4] = struct.pack(">I", len(av1))
    return bytes(head) + struct.pack(">I4s", len(av1) + 8, b"mdat") + av1


def avif_obu(speed: int = 6, **kw) -> AvifObuCodec:
    return AvifObuCodec("avif-obu", "AVIF", (0, 100),
                        lambda q: {"quality": q, "speed": speed, "subsampling": "4:2:0", "max_threads": 1},
                        label=f"AVIF, AV1 bitstream only (container rebuilt by the receiver), speed {speed}", **kw)


CLASSICAL = {"jpeg": jpeg, "webp": webp, "avif": avif, "avif-obu": avif_obu, "jxl": jxl}


def availability(name: str) -> str | None:
    """None if the codec can run here, else a one-line reason."""
    from PIL import features

    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401
        except ImportError:
            return "JPEG XL skipped: pillow-jxl-plugin is not installed (pip install pillow-jxl-plugin)"
        return None
    feature = {"jpeg": "jpg", "webp": "webp", "avif": "avif", "avif-obu": "avif"}.get(name)
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
