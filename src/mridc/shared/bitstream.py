"""The MRD bitstream: one token frame (keep mask + kept token indices) as bytes.

Layout (version 1, spec in docs/bitstream.md)::

    "MR" | version u8 | flags u8 | width v | height v | grid_h v | grid_w v | model_id u32be
    | codebook_bits u8 | rate_q v | [frame_flags v] | sections... | crc32 u32be

``v`` is an unsigned LEB128 varint (canonical, at most 5 bytes). A section is
``type u8 | length v | payload``. The CRC32 covers every byte before it.

Parsing treats its input as untrusted: every declared size is capped, every failure is a
``BitstreamError`` with a message that names the problem, and the work done is bounded by the caps.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mridc.shared.entropy import (
    CorruptStreamError,
    TokenPrior,
    decode_mask,
    decode_tokens_adaptive,
    decode_tokens_static,
    encode_mask,
    encode_tokens_adaptive,
    encode_tokens_static,
)

MAGIC = b"MR"
FORMAT_VERSION = 1

# Header flag bits.
FLAG_ALL_KEPT = 0x01  # every token is sent: no mask section
FLAG_NONE_KEPT = 0x02  # no token is sent: no mask and no token section
FLAG_FRAME_FLAGS = 0x04  # a frame_flags varint follows rate_q (TokenFrame.flags != 0)
FLAG_SLICED = 0x08  # this stream is one slice of a frame: a band of token rows (decompress_slices)
FLAG_INTER = 0x10  # inter frame: coded against a reference frame the decoder holds (inter.decompress_inter)
# The grid covers the frame resampled to exactly grid*stride pixels in either direction (a grid finer than the
# frame's full-resolution one buys quality with a budget that full resolution cannot spend). Decoders that
# predate it refuse the stream (unknown flag) rather than crop it, which the implicit v1 rule would do.
FLAG_RESAMPLED = 0x20
_FLAGS_V1 = FLAG_ALL_KEPT | FLAG_NONE_KEPT | FLAG_FRAME_FLAGS | FLAG_RESAMPLED
_RESERVED_FEATURES: dict[int, str] = {}  # flag bit -> feature name, refused by name

# Section types. Bit 7 set = ancillary: a decoder that does not know it skips it.
# Unknown types without bit 7 are critical and refused.
SECTION_MASK = 0x01  # keep mask, context-adaptive binary coder
SECTION_TOKENS_STATIC = 0x02  # kept tokens, static prior
SECTION_TOKENS_ADAPTIVE = 0x03  # kept tokens, neighbour-match flags + static prior
SECTION_SLICE = 0x04  # a slice's place in its frame: frame_tag u32 | row_start v | row_count v
SECTION_REFERENCE = 0x05  # inter frames only: ref_sequence v | ref_crc u32 (the reference grid's crc)
SECTION_TOKENS_REF = 0x06  # inter frames only: changed tokens, reference-candidate flags + static prior
SECTION_ANCILLARY = 0x80
_SECTION_NAMES = {
    SECTION_MASK: "mask",
    SECTION_TOKENS_STATIC: "tokens-static",
    SECTION_TOKENS_ADAPTIVE: "tokens-adaptive",
    SECTION_SLICE: "slice",
    SECTION_REFERENCE: "reference",
    SECTION_TOKENS_REF: "tokens-ref",
}

# Caps on declared sizes: what a decoder accepts from untrusted bytes.
MAX_IMAGE_SIDE = 16384
MAX_GRID_SIDE = 1024
MAX_CODEBOOK_BITS = 16
MAX_SECTIONS = 16
MAX_VARINT_BYTES = 5
_U32 = 0xFFFFFFFF
_CRC_BYTES = 4

TokenCoder = Literal["auto", "static", "adaptive"]


class BitstreamError(ValueError):
    """Raised for every stream that cannot be parsed or decoded, with a message naming why."""


@dataclass(frozen=True)
class TokenFrame:
    """What the edge encoder produces and the cloud decoder consumes."""

    width: int  # original image size in pixels
    height: int
    grid_h: int  # token grid
    grid_w: int
    model_id: int  # u32, from the tokenizer codebook (shared/zoo.py)
    codebook_bits: int  # log2(codebook size)
    keep_mask: np.ndarray  # bool (grid_h, grid_w): True = token sent
    kept_tokens: np.ndarray  # uint16 (keep_mask.sum(),), raster order of kept positions
    rate_q: int = 0  # rate parameter the encoder used (informational)
    flags: int = 0  # application flags, carried opaquely
    resampled: bool = False  # FLAG_RESAMPLED: the grid covers the frame resampled to grid*stride pixels

    def __eq__(self, other: object) -> bool:  # arrays compare by value
        if not isinstance(other, TokenFrame):
            return NotImplemented
        return (
            (self.width, self.height, self.grid_h, self.grid_w, self.model_id, self.codebook_bits,
             self.rate_q, self.flags, self.resampled)
            == (other.width, other.height, other.grid_h, other.grid_w, other.model_id,
                other.codebook_bits, other.rate_q, other.flags, other.resampled)
            and np.array_equal(np.asarray(self.keep_mask, bool), np.asarray(other.keep_mask, bool))
            and np.array_equal(np.asarray(self.kept_tokens).astype(np.int64),
                               np.asarray(other.kept_tokens).astype(np.int64))
        )


# --------------------------------------------------------------------------- varints


def write_varint(value: int) -> bytes:
    if not 0 <= value < 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a canonical LEB128 varint at ``pos`` (not past ``end``); return (value, new pos)."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= end:
            raise BitstreamError(f"truncated stream: {what} runs past the end")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise BitstreamError(f"non-canonical varint for {what}")
            return value, pos + i + 1
    raise BitstreamError(f"varint for {what} longer than {MAX_VARINT_BYTES} bytes")


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    width: int
    height: int
    grid_h: int
    grid_w: int
    model_id: int
    codebook_bits: int
    rate_q: int
    frame_flags: int


def _check_frame(frame: TokenFrame) -> tuple[np.ndarray, np.ndarray]:
    def in_range(name: str, value: int, lo: int, hi: int) -> None:
        if not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ValueError(f"TokenFrame.{name} must be an int in [{lo}, {hi}], got {value!r}")

    in_range("width", frame.width, 1, MAX_IMAGE_SIDE)
    in_range("height", frame.height, 1, MAX_IMAGE_SIDE)
    in_range("grid_h", frame.grid_h, 1, MAX_GRID_SIDE)
    in_range("grid_w", frame.grid_w, 1, MAX_GRID_SIDE)
    in_range("model_id", frame.model_id, 0, _U32)
    in_range("codebook_bits", frame.codebook_bits, 1, MAX_CODEBOOK_BITS)
    in_range("rate_q", frame.rate_q, 0, _U32)
    in_range("flags", frame.flags, 0, _U32)
    mask = np.asarray(frame.keep_mask)
    if mask.shape != (frame.grid_h, frame.grid_w):
        raise ValueError(f"keep_mask shape {mask.shape} != grid ({frame.grid_h}, {frame.grid_w})")
    if mask.dtype != bool:
        raise ValueError(f"keep_mask must be bool, got {mask.dtype}")
    tokens = np.asarray(frame.kept_tokens).reshape(-1)
    if tokens.size != int(mask.sum()):
        raise ValueError(f"{tokens.size} kept tokens for {int(mask.sum())} kept positions")
    if tokens.size and (tokens.dtype.kind not in "ui" or tokens.min() < 0
                        or int(tokens.max()) >= 1 << frame.codebook_bits):
        raise ValueError(f"kept_tokens must be integers in [0, 2**{frame.codebook_bits})")
    return mask, tokens


def _check_prior(prior: TokenPrior, codebook_bits: int, error: type[Exception]) -> None:
    if prior.size != 1 << codebook_bits:
        raise error(f"prior has {prior.size} symbols but the frame's codebook has 2**{codebook_bits}")


def _section(kind: int, payload: bytes) -> bytes:
    return bytes((kind,)) + write_varint(len(payload)) + payload


def _write_header(frame: TokenFrame, kept: int, positions: int | None = None, extra_flags: int = 0) -> bytes:
    """The header; ALL_KEPT / NONE_KEPT compare `kept` with `positions` (a slice's band; default the grid)."""
    flags = extra_flags
    if kept == (frame.grid_h * frame.grid_w if positions is None else positions):
        flags |= FLAG_ALL_KEPT
    elif kept == 0:
        flags |= FLAG_NONE_KEPT
    if frame.flags:
        flags |= FLAG_FRAME_FLAGS
    if frame.resampled:
        flags |= FLAG_RESAMPLED
    out = bytearray(MAGIC)
    out += bytes((FORMAT_VERSION, flags))
    for value in (frame.width, frame.height, frame.grid_h, frame.grid_w):
        out += write_varint(int(value))
    out += int(frame.model_id).to_bytes(4, "big")
    out.append(int(frame.codebook_bits))
    out += write_varint(int(frame.rate_q))
    if frame.flags:
        out += write_varint(int(frame.flags))
    return bytes(out)


def compress(frame: TokenFrame, prior: TokenPrior, *, token_coder: TokenCoder = "auto") -> bytes:
    """Serialise ``frame``. ``token_coder="auto"`` codes the tokens both ways and keeps the smaller;
    "static" or "adaptive" force one (about half the time, e.g. inside a rate-control loop)."""
    mask, tokens = _check_frame(frame)
    _check_prior(prior, frame.codebook_bits, ValueError)
    if token_coder not in ("auto", "static", "adaptive"):
        raise ValueError(f"token_coder must be auto, static or adaptive, got {token_coder!r}")
    kept = tokens.size
    out = bytearray(_write_header(frame, kept))
    if 0 < kept < mask.size:
        out += _section(SECTION_MASK, encode_mask(mask))
    if kept:
        candidates = []
        if token_coder in ("auto", "static"):
            candidates.append(_section(SECTION_TOKENS_STATIC, encode_tokens_static(tokens, prior)))
        if token_coder in ("auto", "adaptive"):
            candidates.append(_section(SECTION_TOKENS_ADAPTIVE, encode_tokens_adaptive(tokens, mask, prior)))
        out += min(candidates, key=len)  # ties keep static: it decodes faster
    out += zlib.crc32(out).to_bytes(4, "big")
    return bytes(out)


def _parse(data: bytes, *, sliced: bool = False, inter: bool = False) -> tuple[Header, list[tuple[int, int, int]], int]:
    """Check CRC and header; return (header, [(type, offset, length)], header size)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise BitstreamError("empty stream")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError(f"not an MRD stream (magic {data[:2].hex()}, expected {MAGIC.hex()})")
    if len(data) < len(MAGIC) + 2:
        raise BitstreamError("truncated stream: header cut short")
    version = data[2]
    if version != FORMAT_VERSION:
        raise BitstreamError(f"unsupported MRD format version {version} (this decoder reads version "
                             f"{FORMAT_VERSION})")
    min_size = len(MAGIC) + 2 + 4 + 4 + 1 + 1 + _CRC_BYTES
    if len(data) < min_size:
        raise BitstreamError(f"truncated stream: {len(data)} bytes, a v1 stream has at least {min_size}")
    end = len(data) - _CRC_BYTES
    stored = int.from_bytes(data[end:], "big")
    actual = zlib.crc32(data[:end])
    if stored != actual:
        raise BitstreamError(f"CRC mismatch (stored {stored:08x}, computed {actual:08x}): "
                             "stream truncated or corrupted")
    flags = data[3]
    for bit, feature in _RESERVED_FEATURES.items():
        if flags & bit:
            raise BitstreamError(f"stream uses {feature} (flag 0x{bit:02x}), not supported by this "
                                 f"decoder (format version {FORMAT_VERSION})")
    if flags & FLAG_INTER and not inter:
        raise BitstreamError("stream is an inter frame (flag 0x10), coded against a reference frame: decode it "
                             "with its reference using decompress_inter")
    if not flags & FLAG_INTER and inter:
        raise BitstreamError("not an inter frame (flag 0x10 unset): decode it with decompress")
    if flags & FLAG_SLICED and not sliced:
        raise BitstreamError("stream is one slice of a sliced frame (flag 0x08): decode the frame's slices "
                             "together with decompress_slices")
    if not flags & FLAG_SLICED and sliced:
        raise BitstreamError("not a slice (flag 0x08 unset): decode it with decompress")
    unknown = flags & ~(_FLAGS_V1 | FLAG_SLICED | FLAG_INTER) & 0xFF
    if unknown:
        raise BitstreamError(f"unknown header flags 0x{unknown:02x}")
    if flags & FLAG_ALL_KEPT and flags & FLAG_NONE_KEPT:
        raise BitstreamError("header flags say both all-kept and none-kept")
    pos = 4
    width, pos = read_varint(data, pos, end, "width")
    height, pos = read_varint(data, pos, end, "height")
    grid_h, pos = read_varint(data, pos, end, "grid_h")
    grid_w, pos = read_varint(data, pos, end, "grid_w")
    for name, value, cap in (("width", width, MAX_IMAGE_SIDE), ("height", height, MAX_IMAGE_SIDE),
                             ("grid_h", grid_h, MAX_GRID_SIDE), ("grid_w", grid_w, MAX_GRID_SIDE)):
        if not 1 <= value <= cap:
            raise BitstreamError(f"{name} {value} out of range [1, {cap}]")
    if pos + 5 > end:
        raise BitstreamError("truncated stream: model id / codebook bits cut short")
    model_id = int.from_bytes(data[pos: pos + 4], "big")
    codebook_bits = data[pos + 4]
    pos += 5
    if not 1 <= codebook_bits <= MAX_CODEBOOK_BITS:
        raise BitstreamError(f"codebook_bits {codebook_bits} out of range [1, {MAX_CODEBOOK_BITS}]")
    rate_q, pos = read_varint(data, pos, end, "rate_q")
    frame_flags = 0
    if flags & FLAG_FRAME_FLAGS:
        frame_flags, pos = read_varint(data, pos, end, "frame flags")
    if rate_q > _U32 or frame_flags > _U32:
        raise BitstreamError("rate_q or frame flags exceed 32 bits")
    header = Header(version, flags, width, height, grid_h, grid_w, model_id, codebook_bits, rate_q,
                    frame_flags)
    header_size = pos
    sections = []
    while pos < end:
        if len(sections) >= MAX_SECTIONS:
            raise BitstreamError(f"more than {MAX_SECTIONS} sections")
        kind = data[pos]
        length, pos = read_varint(data, pos + 1, end, f"length of section 0x{kind:02x}")
        if length > end - pos:
            raise BitstreamError(f"section 0x{kind:02x} declares {length} bytes, only {end - pos} left")
        sections.append((kind, pos, length))
        pos += length
    return header, sections, header_size


def _section_name(kind: int) -> str:
    if kind in _SECTION_NAMES:
        return _SECTION_NAMES[kind]
    return f"ancillary 0x{kind:02x}" if kind & SECTION_ANCILLARY else f"unknown 0x{kind:02x}"


def inspect(data: bytes) -> dict:
    """Header fields and section sizes, checked (magic, version, CRC, caps); needs no prior.

    An inter frame is described too (``inter``, ``ref_sequence``, ``ref_crc32``); it needs no reference."""
    inter = is_inter(data)
    header, sections, header_size = _parse(data, inter=inter)
    info = {
        "magic": MAGIC.decode(),
        "version": header.version,
        "flags": header.flags,
        "all_kept": bool(header.flags & FLAG_ALL_KEPT),
        "none_kept": bool(header.flags & FLAG_NONE_KEPT),
        "resampled": bool(header.flags & FLAG_RESAMPLED),
        "inter": inter,
        "width": header.width,
        "height": header.height,
        "grid_h": header.grid_h,
        "grid_w": header.grid_w,
        "model_id": header.model_id,
        "model_id_hex": f"{header.model_id:08x}",
        "codebook_bits": header.codebook_bits,
        "rate_q": header.rate_q,
        "frame_flags": header.frame_flags,
        "header_bytes": header_size,
        "sections": [{"type": kind, "name": _section_name(kind), "offset": offset, "bytes": length}
                     for kind, offset, length in sections],
        "crc32": data[-_CRC_BYTES:].hex(),
        "total_bytes": len(data),
        "bpp": 8 * len(data) / (header.width * header.height),
    }
    if inter:
        info["ref_sequence"], ref_crc = reference_fields(bytes(data), sections)
        info["ref_crc32"] = f"{ref_crc:08x}"
    return info


def reference_fields(data: bytes, sections) -> tuple[int, int]:
    """(ref_sequence, ref_crc) from an inter frame's reference section (docs/bitstream.md, "Inter frames")."""
    found = [(offset, length) for kind, offset, length in sections if kind == SECTION_REFERENCE]
    if not found:
        raise BitstreamError("inter frame without a reference section")
    if len(found) > 1:
        raise BitstreamError("duplicate reference section")
    offset, length = found[0]
    end = offset + length
    sequence, pos = read_varint(data, offset, end, "ref_sequence")
    if sequence > _U32:
        raise BitstreamError("ref_sequence exceeds 32 bits")
    if end - pos != 4:
        raise BitstreamError(f"reference section has {end - pos} bytes after ref_sequence, expected 4 (ref_crc)")
    return sequence, int.from_bytes(data[pos:end], "big")


def is_inter(data: bytes) -> bool:
    """Whether `data` looks like an inter frame (an MRD stream with flag 0x10); decompress_inter checks the rest."""
    return (isinstance(data, (bytes, bytearray, memoryview)) and len(data) > len(MAGIC) + 1
            and bytes(data[: len(MAGIC)]) == MAGIC and bool(data[len(MAGIC) + 1] & FLAG_INTER))


def decompress(data: bytes, prior: TokenPrior, *, model_id: int | None = None) -> TokenFrame:
    """Parse and decode a stream. ``model_id``, if given, must match the stream's (the caller's
    tokenizer); otherwise the returned frame's model_id is for the caller to check."""
    header, sections, _ = _parse(data)
    data = bytes(data)
    _check_model(header, model_id)
    _check_prior(prior, header.codebook_bits, BitstreamError)
    mask, tokens = _decode_body(data, header, sections, (header.grid_h, header.grid_w), prior, set())
    return TokenFrame(
        width=header.width, height=header.height, grid_h=header.grid_h, grid_w=header.grid_w,
        model_id=header.model_id, codebook_bits=header.codebook_bits, keep_mask=mask,
        kept_tokens=tokens, rate_q=header.rate_q, flags=header.frame_flags,
        resampled=bool(header.flags & FLAG_RESAMPLED),
    )


def _check_model(header: Header, model_id: int | None) -> None:
    if model_id is not None and header.model_id != model_id:
        raise BitstreamError(f"stream was made with model {header.model_id:08x}, this decoder has "
                             f"model {model_id:08x}")


def decode_mask_section(data: bytes, header: Header, found: dict[int, tuple[int, int]], shape: tuple[int, int],
                        what: str = "mask") -> np.ndarray:
    """The keep mask (an inter frame's change mask): fixed by ALL_KEPT / NONE_KEPT, else the mask section.
    `found` maps section type -> (offset, length). CorruptStreamError from the entropy decoder passes through."""
    if header.flags & (FLAG_ALL_KEPT | FLAG_NONE_KEPT):
        if SECTION_MASK in found:
            raise BitstreamError(f"mask section present although the header flags fix the {what}")
        return np.full(shape, bool(header.flags & FLAG_ALL_KEPT))
    if SECTION_MASK not in found:
        raise BitstreamError("mask section missing")
    offset, length = found[SECTION_MASK]
    return decode_mask(data[offset: offset + length], *shape)


def _decode_body(data: bytes, header: Header, sections, shape: tuple[int, int], prior: TokenPrior,
                 extra_kinds: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The mask and token sections of a stream (or of a slice, whose band has `shape`)."""
    found: dict[int, tuple[int, int]] = {}
    for kind, offset, length in sections:
        if kind & SECTION_ANCILLARY:
            continue  # ancillary: safe to ignore
        if kind not in (SECTION_MASK, SECTION_TOKENS_STATIC, SECTION_TOKENS_ADAPTIVE) and kind not in extra_kinds:
            raise BitstreamError(f"unknown critical section type 0x{kind:02x}")
        if kind in found:
            raise BitstreamError(f"duplicate {_section_name(kind)} section")
        found[kind] = (offset, length)
    token_kinds = [k for k in (SECTION_TOKENS_STATIC, SECTION_TOKENS_ADAPTIVE) if k in found]
    if len(token_kinds) > 1:
        raise BitstreamError("more than one token section")
    try:
        mask = decode_mask_section(data, header, found, shape)
        kept = int(mask.sum())
        if kept == 0:
            if token_kinds:
                raise BitstreamError("token section present although no token is kept")
            tokens = np.zeros(0, dtype=np.uint16)
        else:
            if not token_kinds:
                raise BitstreamError(f"token section missing ({kept} tokens kept)")
            kind = token_kinds[0]
            offset, length = found[kind]
            payload = data[offset: offset + length]
            if kind == SECTION_TOKENS_STATIC:
                tokens = decode_tokens_static(payload, kept, prior)
            else:
                tokens = decode_tokens_adaptive(payload, mask, prior)
    except CorruptStreamError as exc:
        raise BitstreamError(f"corrupt entropy-coded data: {exc}") from None
    return mask, tokens


def header_size(frame: TokenFrame) -> int:
    """Fixed overhead of ``frame``'s stream: header + CRC, without section headers (2-3 bytes each)."""
    return len(_write_header(frame, int(np.asarray(frame.keep_mask).sum()))) + _CRC_BYTES
