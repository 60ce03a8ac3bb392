"""Sliced MRD frames: a frame cut into bands of token rows, each an MRD stream that decodes alone.

For lossy datagram links: each slice fits one packet (``max_bytes``), carries the frame's header and its own
CRC, and a decoder given any subset of a frame's slices rebuilds the frame with the missing bands' tokens
masked, for the cloud's token completion to fill. Spec: docs/bitstream.md, "Sliced frames".

    slices = compress_sliced(frame, prior, max_bytes=222)
    result = decompress_slices(received, prior, model_id=...)   # any subset, any order, duplicates allowed
    result.frame, result.rows_present, result.rejected

A sliced file (``mridc-edge encode --slice-bytes N``) is ``pack_slices(slices)``: ``"MRS" | 0x01`` then each
slice as ``length v | slice``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from mridc.shared.bitstream import (
    _CRC_BYTES,
    FLAG_RESAMPLED,
    FLAG_SLICED,
    MAGIC,
    SECTION_MASK,
    SECTION_SLICE,
    SECTION_TOKENS_ADAPTIVE,
    SECTION_TOKENS_STATIC,
    BitstreamError,
    Header,
    TokenCoder,
    TokenFrame,
    _check_frame,
    _check_model,
    _check_prior,
    _decode_body,
    _parse,
    _section,
    _write_header,
    compress,
    read_varint,
    write_varint,
)
from mridc.shared.entropy import TokenPrior, encode_mask, encode_tokens_adaptive, encode_tokens_static

CONTAINER_MAGIC = b"MRS"
CONTAINER_VERSION = 1
MAX_SLICES = 1024  # a frame has at most MAX_GRID_SIDE token rows, so at most that many slices
MAX_SLICE_BYTES = 64 * 1024
MIN_SLICE_BYTES = 32


@dataclass
class SlicedFrame:
    """What `decompress_slices` rebuilt: the frame (missing rows all masked) and what it was made of."""

    frame: TokenFrame
    rows_present: np.ndarray  # (grid_h,) bool: rows some received slice covered
    slices_used: int
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)  # one reason per slice that was not used

    @property
    def complete(self) -> bool:
        return bool(self.rows_present.all())


def frame_tag(frame: TokenFrame, prior: TokenPrior) -> int:
    """u32 that ties a frame's slices together: the CRC32 of the frame coded whole (`compress`)."""
    return zlib.crc32(compress(frame, prior, token_coder="static"))


def _band(frame: TokenFrame, mask: np.ndarray, tokens: np.ndarray, start: int, count: int) -> tuple:
    """Rows [start, start+count) of the frame: their mask and, in raster order, their kept tokens."""
    before = int(mask[:start].sum())
    band_mask = mask[start:start + count]
    return band_mask, tokens[before:before + int(band_mask.sum())]


def encode_slice(frame: TokenFrame, prior: TokenPrior, tag: int, start: int, count: int,
                 token_coder: TokenCoder = "auto") -> bytes:
    """One slice: rows [start, start+count) of `frame` as a self-contained, CRC-checked MRD stream."""
    mask, tokens = _check_frame(frame)
    band_mask, band_tokens = _band(frame, mask, tokens, start, count)
    kept = band_tokens.size
    out = bytearray(_write_header(frame, kept, positions=band_mask.size, extra_flags=FLAG_SLICED))
    out += _section(SECTION_SLICE, int(tag).to_bytes(4, "big") + write_varint(start) + write_varint(count))
    if 0 < kept < band_mask.size:
        out += _section(SECTION_MASK, encode_mask(band_mask))
    if kept:
        candidates = []
        if token_coder in ("auto", "static"):
            candidates.append(_section(SECTION_TOKENS_STATIC, encode_tokens_static(band_tokens, prior)))
        if token_coder in ("auto", "adaptive"):
            candidates.append(_section(SECTION_TOKENS_ADAPTIVE, encode_tokens_adaptive(band_tokens, band_mask, prior)))
        out += min(candidates, key=len)
    out += zlib.crc32(out).to_bytes(4, "big")
    return bytes(out)


def compress_sliced(frame: TokenFrame, prior: TokenPrior, max_bytes: int,
                    token_coder: TokenCoder = "auto") -> list[bytes]:
    """Cut `frame` into slices of whole token rows, each at most `max_bytes`, greedily (as many rows as fit).

    ValueError when one token row alone does not fit (the message says how many bytes it needs)."""
    if not MIN_SLICE_BYTES <= max_bytes <= MAX_SLICE_BYTES:
        raise ValueError(f"max_bytes must be in [{MIN_SLICE_BYTES}, {MAX_SLICE_BYTES}], got {max_bytes}")
    _check_frame(frame)
    _check_prior(prior, frame.codebook_bits, ValueError)
    tag = frame_tag(frame, prior)
    slices, start = [], 0
    while start < frame.grid_h:
        best = None
        count = 1
        while start + count <= frame.grid_h:
            candidate = encode_slice(frame, prior, tag, start, count, token_coder)
            if len(candidate) > max_bytes:
                break
            best = (candidate, count)
            count += 1
        if best is None:
            need = len(encode_slice(frame, prior, tag, start, 1, token_coder))
            raise ValueError(f"token row {start} alone needs a {need}-byte slice, over max_bytes={max_bytes}")
        slices.append(best[0])
        start += best[1]
    return slices


@dataclass(frozen=True)
class Slice:
    header: Header
    tag: int
    row_start: int
    row_count: int
    mask: np.ndarray
    tokens: np.ndarray
    raw: bytes


def parse_slice(data: bytes, prior: TokenPrior, *, model_id: int | None = None) -> Slice:
    """One slice, checked (CRC, header caps, band inside the grid, entropy data). BitstreamError if bad."""
    header, sections, _ = _parse(data, sliced=True)
    data = bytes(data)
    _check_model(header, model_id)
    _check_prior(prior, header.codebook_bits, BitstreamError)
    slice_sections = [(o, n) for kind, o, n in sections if kind == SECTION_SLICE]
    if len(slice_sections) != 1:
        raise BitstreamError(f"a slice needs exactly one slice section, found {len(slice_sections)}")
    offset, length = slice_sections[0]
    end = offset + length
    if length < 6:
        raise BitstreamError("slice section cut short")
    tag = int.from_bytes(data[offset:offset + 4], "big")
    start, pos = read_varint(data, offset + 4, end, "row_start")
    count, pos = read_varint(data, pos, end, "row_count")
    if pos != end:
        raise BitstreamError(f"slice section has {end - pos} unexpected trailing bytes")
    if count < 1 or start + count > header.grid_h:
        raise BitstreamError(f"slice rows {start}..{start + count - 1} outside the {header.grid_h}-row grid")
    mask, tokens = _decode_body(data, header, sections, (count, header.grid_w), prior, {SECTION_SLICE})
    return Slice(header, tag, start, count, mask, tokens, data)


def _same_frame(a: Header, b: Header) -> bool:
    fields = ("width", "height", "grid_h", "grid_w", "model_id", "codebook_bits", "rate_q", "frame_flags")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and (a.flags & FLAG_RESAMPLED) == (
        b.flags & FLAG_RESAMPLED)


def decompress_slices(slices: list[bytes], prior: TokenPrior, *, model_id: int | None = None) -> SlicedFrame:
    """Rebuild one frame from any subset of its slices, in any order, duplicates allowed.

    Bad slices (corrupt, another model's, another frame's, overlapping what was already placed) are left
    out and named in `rejected`; rows no slice covers are masked. BitstreamError when no slice is usable."""
    if len(slices) > MAX_SLICES:
        raise BitstreamError(f"{len(slices)} slices, at most {MAX_SLICES} per frame")
    parsed: list[Slice] = []
    rejected: list[str] = []
    for i, data in enumerate(slices):
        try:
            parsed.append(parse_slice(data, prior, model_id=model_id))
        except BitstreamError as exc:
            rejected.append(f"slice {i}: {exc}")
    if not parsed:
        raise BitstreamError("no usable slice" + (f" ({rejected[0]})" if rejected else ""))
    # The frame is the one most slices belong to (a stray slice of another frame cannot take it over).
    tags: dict[int, int] = {}
    for s in parsed:
        tags[s.tag] = tags.get(s.tag, 0) + 1
    tag = max(tags, key=lambda t: (tags[t], -[s.tag for s in parsed].index(t)))
    first = next(s for s in parsed if s.tag == tag)
    h, w = first.header.grid_h, first.header.grid_w
    mask = np.zeros((h, w), dtype=bool)
    grid = np.zeros((h, w), dtype=np.int64)
    present = np.zeros(h, dtype=bool)
    seen: dict[tuple[int, int], bytes] = {}
    duplicates = used = 0
    for s in parsed:
        rows = slice(s.row_start, s.row_start + s.row_count)
        if s.tag != tag or not _same_frame(s.header, first.header):
            rejected.append(f"rows {s.row_start}+{s.row_count}: another frame's slice (tag {s.tag:08x})")
            continue
        key = (s.row_start, s.row_count)
        if key in seen:
            if seen[key] == s.raw:
                duplicates += 1
            else:
                rejected.append(f"rows {s.row_start}+{s.row_count}: conflicts with a slice already placed")
            continue
        if present[rows].any():
            rejected.append(f"rows {s.row_start}+{s.row_count}: overlaps rows already placed")
            continue
        seen[key] = s.raw
        present[rows] = True
        mask[rows] = s.mask
        band = np.zeros((s.row_count, w), dtype=np.int64)
        band[s.mask] = s.tokens
        grid[rows] = band
        used += 1
    hd = first.header
    frame = TokenFrame(width=hd.width, height=hd.height, grid_h=h, grid_w=w, model_id=hd.model_id,
                       codebook_bits=hd.codebook_bits, keep_mask=mask,
                       kept_tokens=grid[mask].astype(first.tokens.dtype if first.tokens.size else np.uint16),
                       rate_q=hd.rate_q, flags=hd.frame_flags, resampled=bool(hd.flags & FLAG_RESAMPLED))
    return SlicedFrame(frame, present, used, duplicates, rejected)


# -- the sliced file: "MRS" | version | (length v | slice)* ------------------------------------------------
def pack_slices(slices: list[bytes]) -> bytes:
    out = bytearray(CONTAINER_MAGIC + bytes((CONTAINER_VERSION,)))
    for data in slices:
        out += write_varint(len(data)) + data
    return bytes(out)


def is_slice(data: bytes) -> bool:
    """Whether `data` looks like one slice (an MRD stream with the sliced flag); parse_slice checks the rest."""
    return len(data) > len(MAGIC) + 1 and data[: len(MAGIC)] == MAGIC and bool(data[len(MAGIC) + 1] & FLAG_SLICED)


def is_sliced_file(data: bytes) -> bool:
    return bytes(data[:len(CONTAINER_MAGIC)]) == CONTAINER_MAGIC


def unpack_slices(data: bytes) -> list[bytes]:
    """The slices of a sliced file; BitstreamError on a wrong magic or version, or a cut-short file."""
    data = bytes(data)
    if not is_sliced_file(data):
        raise BitstreamError(f"not a sliced MRD file (magic {data[:3].hex()}, expected {CONTAINER_MAGIC.hex()})")
    if len(data) < 4 or data[3] != CONTAINER_VERSION:
        raise BitstreamError(f"unsupported sliced-file version {data[3] if len(data) > 3 else '(missing)'}")
    slices, pos = [], 4
    while pos < len(data):
        if len(slices) >= MAX_SLICES:
            raise BitstreamError(f"more than {MAX_SLICES} slices")
        length, pos = read_varint(data, pos, len(data), "slice length")
        if not _CRC_BYTES < length <= MAX_SLICE_BYTES or pos + length > len(data):
            raise BitstreamError(f"slice {len(slices)} declares {length} bytes, {len(data) - pos} left")
        slices.append(data[pos:pos + length])
        pos += length
    if not slices:
        raise BitstreamError("sliced file holds no slice")
    return slices
