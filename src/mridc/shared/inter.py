"""Inter MRD frames: a frame coded against a reference grid that the cloud already holds.

Static cameras see the same scene frame after frame. An inter frame sends only the positions whose token
changed since the reference (the *change mask*) and their new tokens, coded with the reference's tokens as
context; the decoder overwrites the reference with them. Spec: docs/bitstream.md, "Inter frames".

    reference = ReferenceGrid.from_frame(previous)                   # what both ends know of a frame
    data = compress_inter(changes, reference, ref_sequence=41, prior=prior)
    header, seq, crc = parse_inter_header(data)                      # cloud: look the reference up by (seq, crc)
    result = decompress_inter(data, prior, reference, model_id=...)  # BitstreamError if it is not the one
    result.grid                                                      # the new ReferenceGrid (apply_inter)
    result.frame                                                     # the TokenFrame the decoder completes

``changes.keep_mask`` marks the changed positions and ``changes.kept_tokens`` holds their new tokens in raster
order. Coding is integer-only and deterministic (the same bytes on every platform), like entropy.py.
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mridc.shared.bitstream import (
    _U32,
    FLAG_INTER,
    FLAG_RESAMPLED,
    MAX_GRID_SIDE,
    SECTION_ANCILLARY,
    SECTION_MASK,
    SECTION_REFERENCE,
    SECTION_TOKENS_ADAPTIVE,
    SECTION_TOKENS_REF,
    SECTION_TOKENS_STATIC,
    BitstreamError,
    Header,
    TokenFrame,
    _check_frame,
    _check_model,
    _check_prior,
    _parse,
    _section,
    _section_name,
    _write_header,
    decode_mask_section,
    is_inter,
    reference_fields,
    write_varint,
)
from mridc.shared.entropy import (
    _RANGE_INIT,
    _TOP,
    MATCH_ADAPT_SHIFT,
    PROB_BITS,
    PROB_INIT,
    CorruptStreamError,
    TokenPrior,
    _check_tokens,
    _Sink,
    _start_decoder,
    decode_tokens_adaptive,
    decode_tokens_static,
    encode_mask,
    encode_tokens_adaptive,
    encode_tokens_static,
)

__all__ = [
    "InterFrame",
    "ReferenceGrid",
    "apply_inter",
    "compress_inter",
    "decode_tokens_ref",
    "decompress_inter",
    "encode_tokens_ref",
    "inter_token_frame",
    "is_inter",
    "parse_inter_header",
]

InterTokenCoder = Literal["auto", "static", "adaptive", "ref"]
MAX_CANDIDATES = 4  # reference-candidate flags per changed token (one adaptive context per rank)
MAX_TOKEN = 0xFFFF  # tokens are at most 16 bits (MAX_CODEBOOK_BITS)


# --------------------------------------------------------------------------- reference grid


@dataclass(frozen=True, eq=False)
class ReferenceGrid:
    """What both ends know of one frame: the token grid and which positions' tokens the cloud holds.

    Tokens at unknown positions carry no information; they are stored as 0 so equal grids compare equal. The
    arrays are read-only copies: a grid the cloud keeps as a reference cannot change under it."""

    tokens: np.ndarray  # int64 (grid_h, grid_w)
    known: np.ndarray  # bool (grid_h, grid_w): True = the cloud holds this position's token

    def __post_init__(self) -> None:
        known = np.asarray(self.known)
        tokens = np.asarray(self.tokens)
        if known.dtype != bool:
            raise ValueError(f"ReferenceGrid.known must be bool, got {known.dtype}")
        if known.ndim != 2 or not all(1 <= side <= MAX_GRID_SIDE for side in known.shape):
            raise ValueError(f"ReferenceGrid.known must be a grid of sides 1..{MAX_GRID_SIDE}, got {known.shape}")
        if tokens.shape != known.shape:
            raise ValueError(f"ReferenceGrid.tokens shape {tokens.shape} != known shape {known.shape}")
        if tokens.dtype.kind not in "ui":
            raise ValueError(f"ReferenceGrid.tokens must be integers, got {tokens.dtype}")
        held = tokens[known]
        if held.size and (held.min() < 0 or held.max() > MAX_TOKEN):
            raise ValueError(f"ReferenceGrid.tokens must be in [0, {MAX_TOKEN}] at known positions")
        canonical = np.where(known, tokens, 0).astype(np.int64)
        known = known.copy()
        canonical.setflags(write=False)
        known.setflags(write=False)
        object.__setattr__(self, "tokens", canonical)
        object.__setattr__(self, "known", known)

    @property
    def shape(self) -> tuple[int, int]:
        return self.known.shape

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceGrid):
            return NotImplemented
        return np.array_equal(self.known, other.known) and np.array_equal(self.tokens, other.tokens)

    def crc(self) -> int:
        """u32 naming this grid in an inter frame: zlib.crc32 of grid_h u16be | grid_w u16be |
        np.packbits(known, raster order) | the known tokens as u16le in raster order."""
        h, w = self.shape
        canonical = (h.to_bytes(2, "big") + w.to_bytes(2, "big") + np.packbits(self.known.reshape(-1)).tobytes()
                     + self.tokens[self.known].astype("<u2").tobytes())
        return zlib.crc32(canonical)

    @classmethod
    def from_frame(cls, frame: TokenFrame) -> ReferenceGrid:
        """The grid an intra frame gives the cloud: its kept tokens are known, its dropped ones are not."""
        mask, tokens = _check_frame(frame)
        grid = np.zeros(mask.shape, dtype=np.int64)
        grid[mask] = tokens.astype(np.int64)
        return cls(grid, mask)

    @classmethod
    def empty(cls, grid_h: int, grid_w: int) -> ReferenceGrid:
        """A grid with nothing known (an inter frame against it refreshes positions, like an intra frame)."""
        return cls(np.zeros((grid_h, grid_w), dtype=np.int64), np.zeros((grid_h, grid_w), dtype=bool))


reference_from_frame = ReferenceGrid.from_frame


@dataclass(frozen=True, eq=False)
class InterFrame:
    """What `decompress_inter` decoded: the changes, which reference they apply to, and the result."""

    header: Header
    ref_sequence: int
    ref_crc: int
    changes: TokenFrame  # keep_mask = change mask, kept_tokens = the new tokens at changed positions
    grid: ReferenceGrid  # apply_inter(reference, changes): the new known grid

    @property
    def frame(self) -> TokenFrame:
        """The TokenFrame the cloud decoder completes (keep_mask = known, kept_tokens = known tokens)."""
        return inter_token_frame(self.grid, self.header)


def apply_inter(reference: ReferenceGrid, changes: InterFrame | TokenFrame) -> ReferenceGrid:
    """The new known grid: the reference with the changed positions overwritten; known = reference.known | mask."""
    if isinstance(changes, InterFrame):
        changes = changes.changes
    mask = np.asarray(changes.keep_mask, dtype=bool)
    if mask.shape != reference.shape:
        raise ValueError(f"change mask {mask.shape} does not match the reference grid {reference.shape}")
    tokens = np.array(reference.tokens)
    tokens[mask] = np.asarray(changes.kept_tokens).reshape(-1).astype(np.int64)
    return ReferenceGrid(tokens, reference.known | mask)


def inter_token_frame(new_grid: ReferenceGrid, header: Header) -> TokenFrame:
    """The TokenFrame of a grid known after an inter frame, with the frame fields of that frame's header."""
    if new_grid.shape != (header.grid_h, header.grid_w):
        raise ValueError(f"grid {new_grid.shape} does not match the header's ({header.grid_h}, {header.grid_w})")
    return TokenFrame(
        width=header.width, height=header.height, grid_h=header.grid_h, grid_w=header.grid_w,
        model_id=header.model_id, codebook_bits=header.codebook_bits, keep_mask=np.array(new_grid.known),
        kept_tokens=new_grid.tokens[new_grid.known].astype(np.uint16), rate_q=header.rate_q,
        flags=header.frame_flags, resampled=bool(header.flags & FLAG_RESAMPLED),
    )


# --------------------------------------------------------------------------- tokens, reference candidates


def _candidates(ref: list[int], cur: list[int], i: int, w: int, n: int) -> list[int]:
    """Up to 4 distinct guesses for the changed token at flat position i, in rank order: the reference's
    left, up, right, down tokens, then the new grid's left and up (-1 = unknown / outside the grid). The
    reference's own token at i is excluded: a changed token differs from it."""
    x = i % w
    own = ref[i]
    out: list[int] = []
    for v in (ref[i - 1] if x else -1, ref[i - w] if i >= w else -1, ref[i + 1] if x + 1 < w else -1,
              ref[i + w] if i + w < n else -1, cur[i - 1] if x else -1, cur[i - w] if i >= w else -1):
        if v >= 0 and v != own and v not in out:
            out.append(v)
            if len(out) == MAX_CANDIDATES:
                break
    return out


def _ref_lists(reference: ReferenceGrid) -> list[int]:
    return np.where(reference.known, reference.tokens, -1).reshape(-1).tolist()


def encode_tokens_ref(tokens: np.ndarray, mask: np.ndarray, reference: ReferenceGrid, prior: TokenPrior) -> bytes:
    """Code the changed tokens (raster order of `mask`) with "equals candidate k" flags, static prior otherwise."""
    mask = np.asarray(mask, dtype=bool)
    values = _check_tokens(tokens, prior)
    if mask.shape != reference.shape:
        raise ValueError(f"mask {mask.shape} does not match the reference grid {reference.shape}")
    if len(values) != int(mask.sum()):
        raise ValueError(f"{len(values)} tokens for {int(mask.sum())} changed positions")
    h, w = mask.shape
    ref = _ref_lists(reference)
    cur = list(ref)  # the new grid as the decoder will see it (final values: raster order is causal)
    positions = np.flatnonzero(mask.reshape(-1)).tolist()
    for i, s in zip(positions, values):
        cur[i] = s
    cum, freqs, pbits = prior.cum, prior.freqs, prior.precision_bits
    probs = [PROB_INIT] * MAX_CANDIDATES
    pb, sh, one = PROB_BITS, MATCH_ADAPT_SHIFT, 1 << PROB_BITS
    sink = _Sink()
    shift_low = sink.shift
    low, rng = 0, _RANGE_INIT
    n = h * w
    for i, s in zip(positions, values):
        hit = False
        for c, guess in enumerate(_candidates(ref, cur, i, w, n)):
            hit = s == guess
            p = probs[c]
            bound = (rng >> pb) * p
            if hit:  # bit 0 = "equals this candidate"
                rng = bound
                probs[c] = p + ((one - p) >> sh)
            else:
                low += bound
                rng -= bound
                probs[c] = p - (p >> sh)
            while rng < _TOP:
                rng <<= 8
                low = shift_low(low)
            if hit:
                break
        if hit:
            continue
        rng >>= pbits
        low += cum[s] * rng
        rng *= freqs[s]
        while rng < _TOP:
            rng <<= 8
            low = shift_low(low)
    return sink.finish(low, rng)


def decode_tokens_ref(data: bytes, mask: np.ndarray, reference: ReferenceGrid, prior: TokenPrior) -> np.ndarray:
    """Inverse of `encode_tokens_ref`; one step per flag or token whatever the bytes are."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    data = bytes(data)
    nbytes = len(data)
    code, pos = _start_decoder(data)
    rng = _RANGE_INIT
    cum, freqs, pbits, total = prior.cum, prior.freqs, prior.precision_bits, 1 << prior.precision_bits
    probs = [PROB_INIT] * MAX_CANDIDATES
    pb, sh, one = PROB_BITS, MATCH_ADAPT_SHIFT, 1 << PROB_BITS
    ref = _ref_lists(reference)
    cur = list(ref)
    n = h * w
    out = []
    append = out.append
    for i in np.flatnonzero(mask.reshape(-1)).tolist():
        s = -1
        for c, guess in enumerate(_candidates(ref, cur, i, w, n)):
            p = probs[c]
            bound = (rng >> pb) * p
            if code < bound:
                rng = bound
                probs[c] = p + ((one - p) >> sh)
                s = guess
            else:
                code -= bound
                rng -= bound
                probs[c] = p - (p >> sh)
            while rng < _TOP:
                rng <<= 8
                code = (code << 8) | (data[pos] if pos < nbytes else 0)
                pos += 1
            if s >= 0:
                break
        if s < 0:
            rng >>= pbits
            target = code // rng
            if target >= total:
                raise CorruptStreamError("token section does not decode under this prior")
            s = bisect_right(cum, target) - 1
            code -= cum[s] * rng
            rng *= freqs[s]
            while rng < _TOP:
                rng <<= 8
                code = (code << 8) | (data[pos] if pos < nbytes else 0)
                pos += 1
        cur[i] = s
        append(s)
    return np.array(out, dtype=np.uint16)


# --------------------------------------------------------------------------- encoder


def _check_reference(reference: ReferenceGrid, header_or_frame, error: type[Exception]) -> None:
    if not isinstance(reference, ReferenceGrid):
        raise error(f"reference must be a ReferenceGrid, got {type(reference).__name__}")
    grid = (header_or_frame.grid_h, header_or_frame.grid_w)
    if reference.shape != grid:
        raise error(f"reference grid {reference.shape[0]}x{reference.shape[1]} does not match the frame's "
                    f"{grid[0]}x{grid[1]} grid")
    held = reference.tokens[reference.known]
    if held.size and int(held.max()) >= 1 << header_or_frame.codebook_bits:
        raise error(f"reference holds tokens outside the frame's 2**{header_or_frame.codebook_bits} codebook")


def compress_inter(frame: TokenFrame, reference: ReferenceGrid, ref_sequence: int, prior: TokenPrior, *,
                   token_coder: InterTokenCoder = "auto") -> bytes:
    """Serialise the changes `frame` (keep_mask = changed positions, kept_tokens = their new tokens) against
    `reference`, named by `ref_sequence` (u32, the application's frame number) and ``reference.crc()``.

    ``token_coder="auto"`` codes the tokens three ways (static prior; the intra coder's repeats of the changed
    left/up neighbours, for new content; reference candidates, for moved content) and keeps the smallest
    section (ties: static, then adaptive); "static", "adaptive" or "ref" force one."""
    mask, tokens = _check_frame(frame)
    _check_prior(prior, frame.codebook_bits, ValueError)
    _check_reference(reference, frame, ValueError)
    if token_coder not in ("auto", "static", "adaptive", "ref"):
        raise ValueError(f"token_coder must be auto, static, adaptive or ref, got {token_coder!r}")
    if not isinstance(ref_sequence, (int, np.integer)) or not 0 <= ref_sequence <= _U32:
        raise ValueError(f"ref_sequence must be an int in [0, {_U32}], got {ref_sequence!r}")
    kept = tokens.size
    out = bytearray(_write_header(frame, kept, extra_flags=FLAG_INTER))
    out += _section(SECTION_REFERENCE, write_varint(int(ref_sequence)) + reference.crc().to_bytes(4, "big"))
    if 0 < kept < mask.size:
        out += _section(SECTION_MASK, encode_mask(mask))
    if kept:
        candidates = []
        if token_coder in ("auto", "static"):
            candidates.append(_section(SECTION_TOKENS_STATIC, encode_tokens_static(tokens, prior)))
        if token_coder in ("auto", "adaptive"):
            candidates.append(_section(SECTION_TOKENS_ADAPTIVE, encode_tokens_adaptive(tokens, mask, prior)))
        if token_coder in ("auto", "ref"):
            candidates.append(_section(SECTION_TOKENS_REF, encode_tokens_ref(tokens, mask, reference, prior)))
        out += min(candidates, key=len)  # ties keep the first: static decodes fastest
    out += zlib.crc32(out).to_bytes(4, "big")
    return bytes(out)


# --------------------------------------------------------------------------- decoder

_TOKEN_KINDS = (SECTION_TOKENS_STATIC, SECTION_TOKENS_ADAPTIVE, SECTION_TOKENS_REF)
_INTER_KINDS = (SECTION_REFERENCE, SECTION_MASK, *_TOKEN_KINDS)


def _inter_sections(sections) -> dict[int, tuple[int, int]]:
    """The critical sections of an inter frame by type, checked: known types, no duplicates, one token section."""
    found: dict[int, tuple[int, int]] = {}
    for kind, offset, length in sections:
        if kind & SECTION_ANCILLARY:
            continue  # ancillary: safe to ignore
        if kind not in _INTER_KINDS:
            raise BitstreamError(f"unknown critical section type 0x{kind:02x}")
        if kind in found:
            raise BitstreamError(f"duplicate {_section_name(kind)} section")
        found[kind] = (offset, length)
    if SECTION_REFERENCE not in found:
        raise BitstreamError("inter frame without a reference section")
    if sum(kind in found for kind in _TOKEN_KINDS) > 1:
        raise BitstreamError("more than one token section")
    return found


def _reference_fields(data: bytes, sections) -> tuple[int, int]:
    """(ref_sequence, ref_crc) from an inter frame's reference section, its sections checked first."""
    _inter_sections(sections)
    return reference_fields(data, sections)


def parse_inter_header(data: bytes) -> tuple[Header, int, int]:
    """(header, ref_sequence, ref_crc) of an inter frame, checked (CRC, header caps, sections) without the
    reference or a prior: the cloud uses it to look the reference up. BitstreamError if malformed."""
    header, sections, _ = _parse(data, inter=True)
    sequence, ref_crc = _reference_fields(bytes(data), sections)
    return header, sequence, ref_crc


def decompress_inter(data: bytes, prior: TokenPrior, reference: ReferenceGrid | None, *,
                     model_id: int | None = None) -> InterFrame:
    """Parse and decode an inter frame against `reference`, which must be the grid it was coded against
    (same shape, ``reference.crc()`` equal to the stream's ref_crc). BitstreamError otherwise, naming why."""
    header, sections, _ = _parse(data, inter=True)
    data = bytes(data)
    _check_model(header, model_id)
    _check_prior(prior, header.codebook_bits, BitstreamError)
    found = _inter_sections(sections)
    sequence, ref_crc = _reference_fields(data, sections)
    named = f"reference frame (sequence {sequence}, crc {ref_crc:08x})"
    if reference is None:
        raise BitstreamError(f"inter frame needs its {named}: none given")
    _check_reference(reference, header, BitstreamError)
    if reference.crc() != ref_crc:
        raise BitstreamError(f"wrong reference: the stream was coded against the {named}, the given reference "
                             f"has crc {reference.crc():08x}")
    shape = (header.grid_h, header.grid_w)
    try:
        mask = decode_mask_section(data, header, found, shape, "change mask")
        changed = int(mask.sum())
        token_kind = next((k for k in _TOKEN_KINDS if k in found), None)
        if changed == 0:
            if token_kind is not None:
                raise BitstreamError("token section present although no token changed")
            tokens = np.zeros(0, dtype=np.uint16)
        else:
            if token_kind is None:
                raise BitstreamError(f"token section missing ({changed} tokens changed)")
            offset, length = found[token_kind]
            payload = data[offset: offset + length]
            if token_kind == SECTION_TOKENS_STATIC:
                tokens = decode_tokens_static(payload, changed, prior)
            elif token_kind == SECTION_TOKENS_ADAPTIVE:  # new content: repeats of its own left/up neighbours
                tokens = decode_tokens_adaptive(payload, mask, prior)
            else:
                tokens = decode_tokens_ref(payload, mask, reference, prior)
    except CorruptStreamError as exc:
        raise BitstreamError(f"corrupt entropy-coded data: {exc}") from None
    changes = TokenFrame(
        width=header.width, height=header.height, grid_h=header.grid_h, grid_w=header.grid_w,
        model_id=header.model_id, codebook_bits=header.codebook_bits, keep_mask=mask, kept_tokens=tokens,
        rate_q=header.rate_q, flags=header.frame_flags, resampled=bool(header.flags & FLAG_RESAMPLED),
    )
    return InterFrame(header, sequence, ref_crc, changes, apply_inter(reference, changes))
