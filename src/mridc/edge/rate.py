"""Rate control: the token grid for a resolution scale, the byte budget, and the stream that fits it.

`RateControl.fit` keeps the longest prefix of a selection order whose real entropy-coded stream fits the
budget (`mlm.fit_order_to_budget`: sizes measured by packing, static token coder during the search), then
codes that mask with the adaptive coder too and keeps the smaller stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from mridc.edge import mlm
from mridc.shared import protocol
from mridc.shared.bitstream import TokenCoder, TokenFrame, compress
from mridc.shared.entropy import TokenPrior

GridShape = tuple[int, int]

MAX_BPP = 64  # largest accepted budget; far above any useful rate (the raw indices are ~0.04 bpp)
RATE_Q_PER_BPP = 10000  # the header's informational rate_q is the target bpp in units of 1e-4 (docs/bitstream.md)
RATE_Q_MAX = 65535  # the encoder's cap on rate_q (6.5535 bpp), which keeps its varint within 3 bytes
# Accepted resolution scale factors: below 0.05 a frame is a few tokens; above 1 the grid is finer than the
# frame's full-resolution one (FLAG_RESAMPLED), at scale**2 times the encoder's full-resolution cost.
MIN_SCALE, MAX_SCALE = 0.05, protocol.MAX_RESAMPLE_SCALE
# Share of tokens the auto scale plans to keep. 0.95 beat 0.8 and 0.9 in ad-hoc sweeps on 7-9 eval images
# (not in the repo); the committed evidence is docs/results/rd/compare.md (auto vs full-grid masking).
AUTO_MIN_KEEP = 0.95
AUTO_HEADER_BYTES = 24  # stream overhead the auto grid reserves: MaskingConfig.header_bytes_guess, the same estimate
PRIOR_CODED_RATIO = 0.92  # coded bits per kept token came to ~0.92 x the prior's entropy on the eval set
DEFAULT_TOKEN_ENTROPY_BITS = 9.4  # for manifests without token_entropy_bits (the shipped prior has 9.406)
MASK_BITS_PER_TOKEN = 1.0  # the auto refinement's allowance for the keep mask, per token


@dataclass(frozen=True)
class RateConfig:
    auto_min_keep: float = AUTO_MIN_KEEP
    # The finest grid "auto" may choose. 1.0 keeps a 768x512 frame within the edge's 40 ms encoder budget;
    # above 1, a budget that full resolution cannot spend buys a finer grid (docs/results/rd_finer).
    max_auto_scale: float = 1.0
    token_entropy_bits: float = DEFAULT_TOKEN_ENTROPY_BITS  # the prior's entropy, bits per token

    @classmethod
    def for_manifest(cls, manifest) -> RateConfig:
        """Defaults, with the bundle's measured token entropy where its manifest records one."""
        bits = getattr(manifest, "token_entropy_bits", None)
        return cls(token_entropy_bits=DEFAULT_TOKEN_ENTROPY_BITS if bits is None else float(bits))


class RateControl:
    """Budgets and streams for one bundle (its prior, model id and codebook size)."""

    def __init__(self, prior: TokenPrior, *, model_id: int, codebook_bits: int,
                 search: mlm.SearchSettings | None = None, config: RateConfig | None = None,
                 stride: int | None = None):
        self.prior = prior
        self.stride = stride  # to tell a grid finer than full resolution (FLAG_RESAMPLED); None: never
        self.model_id = int(model_id)
        self.codebook_bits = int(codebook_bits)
        self.search = search or mlm.MaskingConfig()  # the rate search's first estimate and its bound
        self.config = config or RateConfig()
        # Each token's code length under the shipped prior, -log2(freq / 2**precision).
        self.token_bits_table = -np.log2(np.asarray(prior.freqs, np.float64) / 2**prior.precision_bits)

    # -- streams ---------------------------------------------------------------------------------------
    def token_bits(self, tokens: np.ndarray) -> np.ndarray:
        return self.token_bits_table[tokens]

    def token_frame(self, frame_shape: tuple[int, int], tokens: np.ndarray, keep: np.ndarray, rate_q: int = 0
                    ) -> TokenFrame:
        h, w = frame_shape
        return TokenFrame(width=w, height=h, grid_h=tokens.shape[0], grid_w=tokens.shape[1], model_id=self.model_id,
                          codebook_bits=self.codebook_bits, keep_mask=keep, kept_tokens=tokens[keep].astype(np.uint16),
                          rate_q=rate_q, resampled=self.is_finer(frame_shape, tokens.shape))

    def is_finer(self, frame_shape: tuple[int, int], grid: GridShape) -> bool:
        """A grid finer than the frame's full-resolution one: the stream must say so (FLAG_RESAMPLED)."""
        if self.stride is None:
            return False
        full_h, full_w = protocol.grid_shape(frame_shape[1], frame_shape[0], self.stride)
        return grid[0] > full_h or grid[1] > full_w

    def pack(self, frame_shape: tuple[int, int], tokens: np.ndarray, keep: np.ndarray, rate_q: int = 0,
             token_coder: TokenCoder = "auto") -> bytes:
        return compress(self.token_frame(frame_shape, tokens, keep, rate_q), self.prior, token_coder=token_coder)

    # -- budgets ---------------------------------------------------------------------------------------
    @staticmethod
    def target_bytes(bpp: float, width: int, height: int) -> int:
        return mlm.target_bytes_for_bpp(bpp, width, height)

    @staticmethod
    def rate_q(bpp: float) -> int:
        """The header's record of the target rate."""
        return min(RATE_Q_MAX, round(bpp * RATE_Q_PER_BPP))

    def fit(self, frame_shape: tuple[int, int], tokens: np.ndarray, order: np.ndarray, target_bytes: int, *,
            rate_q: int = 0, start_keep: int | None = None) -> tuple[np.ndarray, bytes, mlm.RateInfo]:
        """(keep mask, stream, info): the longest prefix of `order` that fits `target_bytes`.

        Raises ValueError when not even the stream with no token kept fits."""
        keep, stream, info = mlm.fit_order_to_budget(
            order, tokens.shape, target_bytes,
            lambda m: self.pack(frame_shape, tokens, m, rate_q, token_coder="static"), self.search,
            token_bits=self.token_bits(tokens), start_keep=start_keep)
        # The adaptive coder may beat the static one on this frame; never larger than what fitted.
        adaptive = self.pack(frame_shape, tokens, keep, rate_q, token_coder="adaptive")
        stream = adaptive if len(adaptive) < len(stream) else stream
        if info.n_keep < keep.size:
            # Keeping every token drops the mask section, and neighbour matches make smooth (e.g. finer-grid)
            # frames cheap, so all tokens can fit where the search, which assumes sizes grow with the count,
            # stopped short of them (tests/test_finer_grid.py: a smooth frame stopped at a third of its tokens).
            everything = np.ones_like(keep)
            full = self.pack(frame_shape, tokens, everything, rate_q, token_coder="adaptive")
            if len(full) <= target_bytes:
                return everything, full, dataclasses.replace(info, n_keep=keep.size, stream_bytes=len(full),
                                                             next_bytes=None, pack_calls=info.pack_calls + 2)
        return keep, stream, info

    # -- resolution scale ------------------------------------------------------------------------------
    def scaled_grid(self, height: int, width: int, bpp: float | None, scale: float | str | None, stride: int
                    ) -> GridShape | None:
        """The token grid for a resolution scale: None = full resolution.

        "auto" picks the largest grid (same aspect) at which the byte budget can still keep at least
        `auto_min_keep` of the tokens, estimated from the prior's entropy: with a weak predictor, dropping
        resolution costs less than dropping most tokens (docs/results/rd)."""
        if scale is None or scale == 1 or scale == 1.0:
            return None
        finest = auto_max_scale(scale, self.config.max_auto_scale)
        if finest is not None:
            # First guess from the prior's entropy; `refined_auto_grid` corrects it with the frame's own tokens.
            return self.auto_grid(height, width, bpp, PRIOR_CODED_RATIO * self.config.token_entropy_bits, stride,
                                  finest)
        s = float(scale)
        if not MIN_SCALE <= s <= MAX_SCALE:
            raise ValueError(f"scale must be within {MIN_SCALE}..{MAX_SCALE} or 'auto', got {scale}")
        return protocol.grid_shape(width, height, stride, s)

    def refined_auto_grid(self, height: int, width: int, bpp: float, tokens: np.ndarray, stride: int,
                          finest: float | None = None) -> GridShape | None:
        """The auto grid again with this frame's own mean code length (+ the mask's allowance): one extra
        encoder run on a smaller grid, +0.14 dB at 0.02 bpp, +0.22 dB at 0.03 over the one-pass estimate
        (docs/results/rd: rd.json's auto rows vs rd_auto.json)."""
        bits = float(self.token_bits(tokens).mean())
        if finest is not None and finest > 1.0:
            # Finer grids of enlarged frames are smooth: neighbour matches code them well under the prior's
            # estimate, so the estimate left a quarter of a 0.05 bpp budget unspent. Measure the real cost.
            everything = np.ones(tokens.shape, bool)
            coded = self.pack((height, width), tokens, everything, token_coder="adaptive")
            bits = min(bits, (len(coded) - AUTO_HEADER_BYTES) * 8 / tokens.size)
        return self.auto_grid(height, width, bpp, bits + MASK_BITS_PER_TOKEN, stride, finest)

    def auto_grid(self, height: int, width: int, bpp: float | None, bits_per_token: float, stride: int,
                  finest: float | None = None) -> GridShape | None:
        """Largest grid (same aspect) whose tokens, at `bits_per_token`, fill the budget at `auto_min_keep`."""
        if bpp is None:
            return None
        budget_bits = mlm.target_bytes_for_bpp(bpp, width, height) * 8 - 8 * AUTO_HEADER_BYTES
        fit = budget_bits / (bits_per_token * self.config.auto_min_keep)
        full_h, full_w = protocol.grid_shape(width, height, stride)
        if fit >= full_h * full_w:
            finest = self.config.max_auto_scale if finest is None else finest
            if finest <= 1.0:
                return None
            # A budget beyond full resolution: a finer grid, up to `max_auto_scale` of the frame's size, planned
            # with every token kept (no mask section, no keep margin); the rate search masks a few if it is over.
            fit_all = budget_bits / max(bits_per_token - MASK_BITS_PER_TOKEN, 1.0)
            factor = min(math.sqrt(fit_all / (full_h * full_w)), finest)
            grid = (math.floor(height * factor / stride), math.floor(width * factor / stride))
            return grid if grid[0] > full_h or grid[1] > full_w else None
        factor = math.sqrt(max(fit, 1.0) / (full_h * full_w))
        return max(1, math.floor(full_h * factor)), max(1, math.floor(full_w * factor))


def auto_max_scale(scale, default: float) -> float | None:
    """For an automatic scale ("auto", or "auto:MAX" = auto up to a finer grid of MAX), the finest scale it
    may choose; None for any other scale."""
    if not isinstance(scale, str) or not scale.startswith("auto"):
        return None
    if scale == "auto":
        return default
    head, _, value = scale.partition(":")
    try:
        finest = float(value)
    except ValueError:
        finest = -1.0
    if head != "auto" or not 1.0 <= finest <= MAX_SCALE:
        raise ValueError(f"scale {scale!r}: expected 'auto' or 'auto:MAX' with MAX in 1..{MAX_SCALE}")
    return finest


__all__ = ["AUTO_MIN_KEEP", "MAX_BPP", "RateConfig", "RateControl", "auto_max_scale"]
