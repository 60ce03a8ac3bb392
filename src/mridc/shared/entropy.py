"""Portable integer entropy coding for MRD streams.

Everything here is integer arithmetic on Python ints, so the bytes are identical on every
platform (x86, ARM, any CPython). No floats are used for coding. The coder is a byte-oriented
range coder with carry propagation (the LZMA construction), 32-bit range, normalised when the
range drops below 2**24. Three models sit on it:

- ``encode_mask`` / ``decode_mask``: adaptive binary coding of the keep mask, context = the four
  causal neighbours (left, up-left, up, up-right), 16-bit probabilities updated by a shift.
- ``encode_tokens_static`` / ``decode_tokens_static``: kept tokens under a fixed ``TokenPrior``.
- ``encode_tokens_adaptive`` / ``decode_tokens_adaptive``: a context-adaptive variant that first
  codes whether a token repeats its kept left or up neighbour (adaptive binary flags), and falls
  back to the static prior otherwise.

The exact arithmetic is specified in docs/bitstream.md; any change to the bytes produced here is
a format change (tests/vectors/ pins them).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PRECISION_BITS = 16  # TokenPrior frequencies sum to 2**16
PROB_BITS = 16  # binary model probabilities are P(bit == 0) in units of 2**-16
PROB_INIT = 1 << (PROB_BITS - 1)
MASK_ADAPT_SHIFT = 4  # few symbols per frame: adapt fast
MATCH_ADAPT_SHIFT = 4
MAX_SYMBOLS = 1 << 16

_TOP = 1 << 24
_RANGE_INIT = 0xFFFFFFFF


class CorruptStreamError(ValueError):
    """An entropy-coded section does not decode (only possible for corrupt input)."""


# --------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class TokenPrior:
    """Integer frequency table over ``len(freqs)`` token symbols.

    Frequencies sum to exactly ``2**precision_bits`` and each is >= 1, so every token stays codable.
    The table ships with the model (``models/edge/token_prior.npz``) and is never recomputed from
    floats on one side only.
    """

    freqs: tuple[int, ...]
    precision_bits: int = PRECISION_BITS
    cum: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        freqs = tuple(int(f) for f in self.freqs)
        if not 1 <= len(freqs) <= MAX_SYMBOLS:
            raise ValueError(f"a TokenPrior needs 1..{MAX_SYMBOLS} symbols, got {len(freqs)}")
        if self.precision_bits != PRECISION_BITS:
            raise ValueError(f"precision_bits must be {PRECISION_BITS}, got {self.precision_bits}")
        if min(freqs) < 1:
            raise ValueError("every TokenPrior frequency must be >= 1")
        if sum(freqs) != 1 << self.precision_bits:
            raise ValueError(f"TokenPrior frequencies sum to {sum(freqs)}, expected 2**{self.precision_bits}")
        cum = [0]
        for f in freqs:
            cum.append(cum[-1] + f)
        object.__setattr__(self, "freqs", freqs)
        object.__setattr__(self, "cum", tuple(cum))

    @property
    def size(self) -> int:
        return len(self.freqs)

    @classmethod
    def uniform(cls, n: int) -> TokenPrior:
        total = 1 << PRECISION_BITS
        if not 1 <= n <= MAX_SYMBOLS:
            raise ValueError(f"a TokenPrior needs 1..{MAX_SYMBOLS} symbols, got {n}")
        base, extra = divmod(total, n)
        return cls(tuple(base + (1 if i < extra else 0) for i in range(n)))

    @classmethod
    def from_counts(cls, counts) -> TokenPrior:
        """Scale non-negative integer counts to a table summing to 2**16, every entry >= 1.

        Integer-only and deterministic: entry i gets 1 + floor(c_i * spare / sum); the leftover
        units go to the largest remainders, ties to the lower index.
        """
        counts = [int(c) for c in np.asarray(counts).reshape(-1).tolist()]
        n = len(counts)
        total = 1 << PRECISION_BITS
        if not 1 <= n <= MAX_SYMBOLS:
            raise ValueError(f"a TokenPrior needs 1..{MAX_SYMBOLS} symbols, got {n}")
        if min(counts) < 0:
            raise ValueError("counts must be non-negative")
        spare = total - n
        csum = sum(counts)
        if csum == 0 or spare == 0:
            return cls.uniform(n)
        freqs = [1 + c * spare // csum for c in counts]
        left = total - sum(freqs)
        if left:
            order = sorted(range(n), key=lambda i: (-(counts[i] * spare % csum), i))
            for i in order[:left]:
                freqs[i] += 1
        return cls(tuple(freqs))

    def save(self, path: str | Path) -> None:
        np.savez(path, freqs=np.asarray(self.freqs, dtype=np.uint32),
                 precision_bits=np.asarray(self.precision_bits, dtype=np.uint32))

    @classmethod
    def load(cls, path: str | Path) -> TokenPrior:
        with np.load(path, allow_pickle=False) as z:
            freqs = z["freqs"]
            if freqs.dtype.kind not in "ui":
                raise ValueError(f"{path}: freqs must be integers, got {freqs.dtype}")
            bits = int(z["precision_bits"]) if "precision_bits" in z else PRECISION_BITS
        return cls(tuple(int(f) for f in freqs.reshape(-1).tolist()), bits)


# --------------------------------------------------------------------------- range coder core


class _Sink:
    """Byte output of the range encoder with LZMA-style carry propagation."""

    __slots__ = ("cache", "out", "pending")

    def __init__(self) -> None:
        self.out = bytearray()
        self.cache = 0
        self.pending = 0  # bytes equal to 0xFF waiting for a possible carry

    def shift(self, low: int) -> int:
        if low < 0xFF000000 or low > 0xFFFFFFFF:
            carry = low >> 32
            self.out.append((self.cache + carry) & 0xFF)
            if self.pending:
                self.out += bytes(((0xFF + carry) & 0xFF,)) * self.pending
                self.pending = 0
            self.cache = (low >> 24) & 0xFF
        else:
            self.pending += 1
        return (low & 0xFFFFFF) << 8

    def finish(self, low: int, rng: int) -> bytes:
        # The decoder reads zeros past the end, so end on the value in [low, low+rng) with the
        # most trailing zero bits and drop trailing zero bytes: saves ~3 bytes per section.
        hi = low + rng - 1
        k = (low ^ hi).bit_length()
        if low & ((1 << k) - 1) == 0:
            value = low
        else:
            value = hi & ~((1 << (k - 1)) - 1)
        for _ in range(5):
            value = self.shift(value)
        # The first byte is always 0 (the interval starts inside [0, 2**32)): not stored.
        return bytes(self.out[1:]).rstrip(b"\0")


def _start_decoder(data: bytes) -> tuple[int, int]:
    """Return (code, position) after reading the first 4 bytes (zeros past the end)."""
    padded = bytes(data[:4]).ljust(4, b"\0")
    code = int.from_bytes(padded, "big")
    if code >= _RANGE_INIT:
        raise CorruptStreamError("range coder start value out of range")
    return code, 4


# --------------------------------------------------------------------------- keep mask


def _mask_up_contexts(prev: list[int], width: int) -> list[int]:
    """Context bits from the row above: up-left (bit 1), up (bit 2), up-right (bit 3)."""
    padded = [0, *prev, 0]
    return [(padded[x] << 1) | (padded[x + 1] << 2) | (padded[x + 2] << 3) for x in range(width)]


def encode_mask(mask: np.ndarray) -> bytes:
    """Code a 2-D bool keep mask in raster order with a 16-context adaptive binary model."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    bits = mask.astype(np.int64)
    padded = np.pad(bits, ((1, 0), (1, 1)))
    ctx = (padded[1:, :-2]  # left
           | (padded[:-1, :-2] << 1)  # up-left
           | (padded[:-1, 1:-1] << 2)  # up
           | (padded[:-1, 2:] << 3))  # up-right
    probs = [PROB_INIT] * 16
    sink = _Sink()
    shift_low = sink.shift
    low, rng = 0, _RANGE_INIT
    pb, sh, one = PROB_BITS, MASK_ADAPT_SHIFT, 1 << PROB_BITS
    for bit, c in zip(bits.reshape(-1).tolist(), ctx.reshape(-1).tolist()):
        p = probs[c]
        bound = (rng >> pb) * p
        if bit:
            low += bound
            rng -= bound
            probs[c] = p - (p >> sh)
        else:
            rng = bound
            probs[c] = p + ((one - p) >> sh)
        while rng < _TOP:
            rng <<= 8
            low = shift_low(low)
    return sink.finish(low, rng)


def decode_mask(data: bytes, grid_h: int, grid_w: int) -> np.ndarray:
    """Inverse of ``encode_mask``; work is bounded by grid_h * grid_w whatever the bytes are."""
    data = bytes(data)
    n = len(data)
    code, pos = _start_decoder(data)
    rng = _RANGE_INIT
    probs = [PROB_INIT] * 16
    pb, sh, one = PROB_BITS, MASK_ADAPT_SHIFT, 1 << PROB_BITS
    rows: list[list[int]] = []
    prev = [0] * grid_w
    for _ in range(grid_h):
        row = []
        append = row.append
        left = 0
        for up in _mask_up_contexts(prev, grid_w):
            c = up | left
            p = probs[c]
            bound = (rng >> pb) * p
            if code < bound:
                rng = bound
                probs[c] = p + ((one - p) >> sh)
                left = 0
            else:
                code -= bound
                rng -= bound
                probs[c] = p - (p >> sh)
                left = 1
            append(left)
            while rng < _TOP:
                rng <<= 8
                code = (code << 8) | (data[pos] if pos < n else 0)
                pos += 1
        rows.append(row)
        prev = row
    return np.array(rows, dtype=bool).reshape(grid_h, grid_w)


# --------------------------------------------------------------------------- tokens, static prior


def _check_tokens(tokens: np.ndarray, prior: TokenPrior) -> list[int]:
    values = np.asarray(tokens).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= prior.size):
        raise ValueError(f"token values must be in [0, {prior.size}) for this prior")
    return values.astype(np.int64).tolist()


def encode_tokens_static(tokens: np.ndarray, prior: TokenPrior) -> bytes:
    """Code tokens independently under the fixed prior."""
    values = _check_tokens(tokens, prior)
    cum, freqs, pbits = prior.cum, prior.freqs, prior.precision_bits
    sink = _Sink()
    shift_low = sink.shift
    low, rng = 0, _RANGE_INIT
    for s in values:
        rng >>= pbits
        low += cum[s] * rng
        rng *= freqs[s]
        while rng < _TOP:
            rng <<= 8
            low = shift_low(low)
    return sink.finish(low, rng)


def decode_tokens_static(data: bytes, count: int, prior: TokenPrior) -> np.ndarray:
    data = bytes(data)
    n = len(data)
    code, pos = _start_decoder(data)
    rng = _RANGE_INIT
    cum, freqs, pbits, total = prior.cum, prior.freqs, prior.precision_bits, 1 << prior.precision_bits
    out = []
    append = out.append
    for _ in range(count):
        rng >>= pbits
        target = code // rng
        if target >= total:
            raise CorruptStreamError("token section does not decode under this prior")
        s = bisect_right(cum, target) - 1
        code -= cum[s] * rng
        rng *= freqs[s]
        append(s)
        while rng < _TOP:
            rng <<= 8
            code = (code << 8) | (data[pos] if pos < n else 0)
            pos += 1
    return np.array(out, dtype=np.uint16)


# --------------------------------------------------------------------------- tokens, neighbour match

# Match-flag contexts: which causal kept neighbours exist and whether they agree.
_CTX_AGREE = 0  # left and up both kept and equal: one flag "token == left"
_CTX_DIFFER_LEFT = 1  # both kept and different: flag "token == left" ...
_CTX_DIFFER_UP = 2  # ... then flag "token == up"
_CTX_LEFT_ONLY = 3
_CTX_UP_ONLY = 4
_N_MATCH_CTX = 5


def _neighbour_tokens(mask: np.ndarray, tokens: np.ndarray) -> tuple[list[int], list[int]]:
    """Kept left / up neighbour token of each kept position, -1 when that neighbour is dropped."""
    h, w = mask.shape
    grid = np.full((h, w + 1), -1, dtype=np.int64)  # spare column: left of x=0 is -1
    grid[:, 1:][mask] = np.asarray(tokens, dtype=np.int64)
    left = grid[:, :-1][mask]
    up = np.full((h, w), -1, dtype=np.int64)
    up[1:] = grid[:-1, 1:]
    return left.tolist(), up[mask].tolist()


def encode_tokens_adaptive(tokens: np.ndarray, mask: np.ndarray, prior: TokenPrior) -> bytes:
    """Code kept tokens with adaptive "repeats a kept neighbour" flags, static prior otherwise."""
    mask = np.asarray(mask, dtype=bool)
    values = _check_tokens(tokens, prior)
    if len(values) != int(mask.sum()):
        raise ValueError(f"{len(values)} tokens for {int(mask.sum())} kept positions")
    lefts, ups = _neighbour_tokens(mask, np.asarray(values, dtype=np.int64))
    cum, freqs, pbits = prior.cum, prior.freqs, prior.precision_bits
    probs = [PROB_INIT] * _N_MATCH_CTX
    pb, sh, one = PROB_BITS, MATCH_ADAPT_SHIFT, 1 << PROB_BITS
    sink = _Sink()
    shift_low = sink.shift
    low, rng = 0, _RANGE_INIT
    for s, left, up in zip(values, lefts, ups):
        # Up to two flags; each is (context, hit). Written out so the hot loop stays flat.
        if left >= 0:
            if up >= 0 and up != left:
                flags = ((_CTX_DIFFER_LEFT, s == left),) if s == left else \
                    ((_CTX_DIFFER_LEFT, False), (_CTX_DIFFER_UP, s == up))
            else:
                flags = ((_CTX_AGREE if up >= 0 else _CTX_LEFT_ONLY, s == left),)
        elif up >= 0:
            flags = ((_CTX_UP_ONLY, s == up),)
        else:
            flags = ()
        hit = False
        for c, hit in flags:
            p = probs[c]
            bound = (rng >> pb) * p
            if hit:  # bit 0 = "repeats the neighbour"
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
            continue
        rng >>= pbits
        low += cum[s] * rng
        rng *= freqs[s]
        while rng < _TOP:
            rng <<= 8
            low = shift_low(low)
    return sink.finish(low, rng)


def decode_tokens_adaptive(data: bytes, mask: np.ndarray, prior: TokenPrior) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    data = bytes(data)
    n = len(data)
    code, pos = _start_decoder(data)
    rng = _RANGE_INIT
    cum, freqs, pbits, total = prior.cum, prior.freqs, prior.precision_bits, 1 << prior.precision_bits
    probs = [PROB_INIT] * _N_MATCH_CTX
    pb, sh, one = PROB_BITS, MATCH_ADAPT_SHIFT, 1 << PROB_BITS
    grid = [-1] * (h * w)  # decoded tokens by flat position, -1 = dropped
    positions = np.flatnonzero(mask.reshape(-1)).tolist()
    out = []
    append = out.append
    for i in positions:
        left = grid[i - 1] if i % w else -1
        up = grid[i - w] if i >= w else -1
        if left >= 0:
            if up >= 0 and up != left:
                candidates = ((_CTX_DIFFER_LEFT, left), (_CTX_DIFFER_UP, up))
            else:
                candidates = ((_CTX_AGREE if up >= 0 else _CTX_LEFT_ONLY, left),)
        elif up >= 0:
            candidates = ((_CTX_UP_ONLY, up),)
        else:
            candidates = ()
        s = -1
        for c, guess in candidates:
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
                code = (code << 8) | (data[pos] if pos < n else 0)
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
                code = (code << 8) | (data[pos] if pos < n else 0)
                pos += 1
        grid[i] = s
        append(s)
    return np.array(out, dtype=np.uint16)
