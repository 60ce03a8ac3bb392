"""Fixed cameras: each frame coded intra or inter, against a frame the cloud has stored (docs/bitstream.md,
"Inter frames").

`SequenceEncoder` wraps the `EdgeEncoder` and keeps, for every frame it coded, the `ReferenceGrid` the cloud
will hold of it: which token positions it knows, and their tokens. Per frame:

- **intra** on the first frame, every `refresh_period` frames, after `force_intra()` (a reconnect, or the
  cloud's NEED_INTRA), when no acknowledged reference is held, or when most of the scene changed;
- **inter** otherwise, against the newest frame whose STORED ack it holds (so a lost or unacked frame never
  breaks the chain). The positions whose token really changed go first, most changed first; what is left
  of the byte budget refreshes positions the reference does not know yet, by MLM priority. The unchanged
  background costs nothing, so over a few frames the cloud's grid fills in and the budget goes where the
  scene moves.

Change detection runs in token space, with hysteresis: a position counts as changed only when its features
are clearly closer to the new codeword than to the reference's (`change_margin`, in 1 - cosine), so sensor
noise that flips a token between two near codewords costs nothing. A pixel check catches slow light changes
that no single token flip shows: a cell whose mean luma moved by `luma_threshold` since its token was last
sent is sent again.

The chain's grid is fixed by its intra frame (`scale`, full resolution by default: a fine grid that the
chain fills over time is what inter frames buy).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from mridc.shared.bitstream import TokenFrame
from mridc.shared.inter import ReferenceGrid, apply_inter, compress_inter


@dataclass(frozen=True)
class SequenceConfig:
    refresh_period: int = 60  # frames between forced intra frames (0: only when needed)
    # 1 - cosine: how much closer the new codeword must be than the reference's. On vtest training frames at
    # 1 fps and 0.02 bpp (tools/inter_margin.py): 0.05 / 0.1 / 0.2 sent 408 / 348 / 312 B per frame for
    # 22.83 / 22.79 / 22.75 dB.
    change_margin: float = 0.1
    luma_threshold: float = 12.0  # mean luma change of a token cell (0..255) that resends its token
    max_changed_fraction: float = 0.5  # more of the grid changed than this: the scene changed, code intra
    scale: float | None = 1.0  # the chain's grid (1.0: full resolution; None: the encoder's default)
    keep_references: int = 16  # acknowledged references kept (the newest is used)

    def __post_init__(self) -> None:
        if self.refresh_period < 0 or not 0 < self.max_changed_fraction <= 1 or self.change_margin < 0:
            raise ValueError("refresh_period >= 0, 0 < max_changed_fraction <= 1, change_margin >= 0")


@dataclass
class SequenceFrame:
    """One coded frame of a sequence."""

    sequence: int
    bitstream: bytes
    kind: str  # "intra" | "inter"
    ref_sequence: int | None
    grid: ReferenceGrid  # what the cloud holds of this frame once it decodes it
    changed: int  # inter: positions sent because they changed; intra: tokens kept
    refreshed: int  # inter: positions sent that the reference did not know
    bpp: float
    reason: str = ""  # why intra

    @property
    def known_fraction(self) -> float:
        return float(self.grid.known.mean())


@dataclass
class _Reference:
    grid: ReferenceGrid
    luma: np.ndarray  # float32 (gh, gw): each cell's mean luma when its token was last sent
    header: TokenFrame  # frame fields of the chain (size, grid, model id, flags)


def cell_luma(padded: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean luma (BT.601) of each token cell of the encoder's input frame."""
    gh, gw = grid
    h, w = padded.shape[:2]
    luma = padded[..., 0] * 0.299 + padded[..., 1] * 0.587 + padded[..., 2] * 0.114
    return luma[: h - h % gh, : w - w % gw].reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3)).astype(np.float32)


class SequenceEncoder:
    """Intra/inter decisions and reference bookkeeping for one camera (see the module doc)."""

    def __init__(self, encoder, config: SequenceConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or SequenceConfig()
        self._pending: dict[int, _Reference] = {}  # coded, no STORED ack yet
        self._acked: collections.OrderedDict[int, _Reference] = collections.OrderedDict()
        self._force_reason = "first frame"
        self._since_intra = 0

    # -- what the cloud said --------------------------------------------------------------------------------
    def acknowledge(self, sequence: int, stored: bool = True) -> None:
        """The cloud's final answer on a frame: STORED makes it a reference; anything else forgets it."""
        ref = self._pending.pop(sequence, None)
        if ref is None or not stored:
            return
        self._acked[sequence] = ref
        while len(self._acked) > self.config.keep_references:
            self._acked.popitem(last=False)

    def forget(self, sequence: int) -> None:
        """A coded frame that will never reach the cloud (refused or dropped by the queue)."""
        self._pending.pop(sequence, None)

    @property
    def model_id(self) -> int:
        return self.encoder.model_id

    def intra_frame(self, coded: SequenceFrame) -> TokenFrame:
        """The token grid a coded frame leaves in the cloud, as an intra frame: its NEED_INTRA fallback."""
        ref = self._pending.get(coded.sequence) or self._acked.get(coded.sequence)
        header = ref.header if ref is not None else None
        if header is None:
            raise KeyError(f"frame {coded.sequence} is not held by this encoder")
        known = coded.grid.known
        return TokenFrame(width=header.width, height=header.height, grid_h=header.grid_h, grid_w=header.grid_w,
                          model_id=header.model_id, codebook_bits=header.codebook_bits, keep_mask=known.copy(),
                          kept_tokens=coded.grid.tokens[known].astype(np.uint16), rate_q=header.rate_q,
                          flags=header.flags, resampled=header.resampled)

    def force_intra(self, reason: str = "requested") -> None:
        """The next frame is intra (after a reconnect, or when the cloud lacks a reference: NEED_INTRA)."""
        self._force_reason = reason
        self._acked.clear()

    @property
    def reference_sequence(self) -> int | None:
        return next(reversed(self._acked)) if self._acked else None

    # -- coding ----------------------------------------------------------------------------------------------
    def encode(self, image_rgb: np.ndarray, sequence: int, bpp: float) -> SequenceFrame:
        cfg = self.config
        reason = self._force_reason
        if not reason and not self._acked:
            reason = "no acknowledged reference"
        if not reason and cfg.refresh_period and self._since_intra >= cfg.refresh_period:
            reason = "refresh period"
        if not reason:
            frame = self._inter(image_rgb, sequence, bpp)
            if frame is not None:
                self._since_intra += 1
                return frame
            reason = "scene changed"
        return self._intra(image_rgb, sequence, bpp, reason)

    def _intra(self, image_rgb: np.ndarray, sequence: int, bpp: float, reason: str) -> SequenceFrame:
        kwargs = {} if self.config.scale is None else {"scale": self.config.scale}
        result = self.encoder.encode(image_rgb, bpp=bpp, **kwargs)
        frame = result.token_frame
        grid = ReferenceGrid.from_frame(frame)
        padded = self.encoder.input_frame(image_rgb, frame.keep_mask.shape)  # for the luma only: no second pass
        self._pending[sequence] = _Reference(grid, cell_luma(padded, grid.shape), frame)
        self._force_reason = ""
        self._since_intra = 0
        return SequenceFrame(sequence, result.bitstream, "intra", None, grid, int(frame.keep_mask.sum()), 0,
                             result.bpp, reason)

    def _inter(self, image_rgb: np.ndarray, sequence: int, bpp: float) -> SequenceFrame | None:
        cfg, enc = self.config, self.encoder
        ref_seq = self.reference_sequence
        ref = self._acked[ref_seq]
        header = ref.header
        h, w = image_rgb.shape[:2]
        if (w, h) != (header.width, header.height):
            return None
        padded, codes = enc.features(image_rgb, ref.grid.shape)
        tokens, qerr = enc.quantizer.nearest(codes)
        known = ref.grid.known
        d_ref = enc.quantizer.distance(codes, ref.grid.tokens)
        gain = d_ref - qerr  # how much closer the new codeword is than the reference's
        luma = cell_luma(padded, ref.grid.shape)
        differs = tokens != ref.grid.tokens
        changed = known & differs & ((gain > cfg.change_margin) | (np.abs(luma - ref.luma) > cfg.luma_threshold))
        if changed.mean() > cfg.max_changed_fraction:
            return None
        # Changed positions first (most changed first), then refreshes of unknown ones (highest priority first;
        # the MLM map is only worth computing while the cloud lacks some positions).
        changed_idx = np.flatnonzero(changed)
        changed_idx = changed_idx[np.argsort(-gain.reshape(-1)[changed_idx], kind="stable")]
        unknown_idx = np.flatnonzero(~known)
        if unknown_idx.size:
            keys = enc.priority.key_regions(padded, ref.grid.shape, enc.stride)
            priority = enc.priority.score(padded, ref.grid.shape, enc.stride, quant_error=qerr, tokens=tokens,
                                          key_mask=keys.mask)
            unknown_idx = unknown_idx[np.argsort(-priority.reshape(-1)[unknown_idx], kind="stable")]
        order = np.concatenate([changed_idx, unknown_idx])
        target = enc.rate.target_bytes(bpp, w, h)

        def code(n: int) -> tuple[bytes, TokenFrame]:
            mask = np.zeros(tokens.size, dtype=bool)
            mask[order[:n]] = True
            mask = mask.reshape(tokens.shape)
            changes = TokenFrame(width=header.width, height=header.height, grid_h=header.grid_h,
                                 grid_w=header.grid_w, model_id=header.model_id, codebook_bits=header.codebook_bits,
                                 keep_mask=mask, kept_tokens=tokens[mask].astype(np.uint16), rate_q=header.rate_q,
                                 flags=header.flags, resampled=header.resampled)
            return compress_inter(changes, ref.grid, ref_seq, enc.prior), changes

        lo, hi = 0, len(order)
        best = code(0)
        if len(best[0]) <= target:
            full = code(hi)
            if len(full[0]) <= target:
                lo, best = hi, full
            while hi - lo > 1:  # the largest prefix of the order that fits the budget
                mid = (lo + hi) // 2
                attempt = code(mid)
                if len(attempt[0]) <= target:
                    lo, best = mid, attempt
                else:
                    hi = mid
        stream, changes = best
        grid = apply_inter(ref.grid, changes)
        new_luma = np.where(changes.keep_mask, luma, ref.luma).astype(np.float32)
        self._pending[sequence] = _Reference(grid, new_luma, header)
        sent = changes.keep_mask
        return SequenceFrame(sequence, stream, "inter", ref_seq, grid, int((sent & known).sum()),
                             int((sent & ~known).sum()), len(stream) * 8 / (w * h))


__all__ = ["SequenceConfig", "SequenceEncoder", "SequenceFrame", "cell_luma"]
