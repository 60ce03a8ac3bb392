"""BPCG, part 1: a bidirectional token transformer that predicts masked tokens from the kept ones.

MaskGIT-style: embeddings of codebook indices plus one [MASK] embedding, 2-D sine-cosine positions (so one
model serves any grid size), full attention. The iterative sampler lives in `maskgit.py`.

With `copy_kernel` > 0 the logits also get a copy term, as in pointer-generator networks: each kept token adds
a learned, distance-weighted vote for its own index at the positions around it, scaled per position by a gate
that the transformer predicts. Copying a neighbour is the strongest simple guess on image tokens; with the
copy term the model starts from it and learns where to depart from it, instead of having to rediscover it
from a few hundred photos.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PredictorConfig:
    codebook_size: int = 1024
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    copy_kernel: int = 0  # side of the neighbour copy window (odd); 0 = no copy term (the first shipped model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        return cls(**data)


def tiny_predictor_config(codebook_size: int = 64) -> PredictorConfig:
    return PredictorConfig(codebook_size=codebook_size, dim=32, depth=2, heads=2, copy_kernel=3)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device=None, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(grid_h*grid_w, dim) fixed 2-D sine-cosine position embedding, raster order, starting at `offset`."""
    assert dim % 4 == 0
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(offset[0], offset[0] + grid_h, device=device, dtype=torch.float32),
        torch.arange(offset[1], offset[1] + grid_w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ys, xs = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    return torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class BidirectionalTokenPredictor(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.codebook_size
        self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.core_runner = None  # None: `transform` in PyTorch; else a callable that stands in for it
        if cfg.copy_kernel:
            if cfg.copy_kernel % 2 == 0:
                raise ValueError(f"copy_kernel must be odd, got {cfg.copy_kernel}")
            # Start as "nearer is likelier"; the kernel and the gate learn the rest.
            r = torch.arange(cfg.copy_kernel, dtype=torch.float32) - cfg.copy_kernel // 2
            dist = (r[:, None] ** 2 + r[None, :] ** 2).sqrt()
            self.copy_weight = nn.Parameter((-dist)[None, None].clone())
            self.copy_gate = nn.Linear(cfg.dim, 1)
            nn.init.zeros_(self.head.weight)  # so a new model's first guess is the copy, not noise
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.constant_(self.copy_gate.bias, 2.0)

    def forward(self, tokens: torch.Tensor, keep_mask: torch.Tensor,
                position_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """tokens (N,h,w) int64, keep_mask (N,h,w) bool -> logits (N,h,w,K). Masked inputs are ignored.

        `position_offset` shifts the position grid; training draws it at random so that every position of a
        large grid has been seen, not only those of the training crop."""
        n, h, w = tokens.shape
        inp = torch.where(keep_mask, tokens, torch.full_like(tokens, self.mask_id)).reshape(n, h * w)
        x = self.token_embed(inp) + sincos_2d(h, w, self.cfg.dim, tokens.device, position_offset)[None]
        core = self.core_runner if self.core_runner is not None else self.transform
        out = core(x).to(x.device).reshape(n, h, w, -1)
        if not self.cfg.copy_kernel:
            return out
        logits, gate = out[..., :-1], F.softplus(out[..., -1:])
        return logits + gate * self.copy_votes(tokens, keep_mask).to(logits.dtype)

    def copy_votes(self, tokens: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """(N,h,w,K): for each position and index, the kernel-weighted count of kept neighbours with that index
        (a kept position also votes for itself). One scatter per kernel offset: a one-hot convolution over K
        planes costs K times more."""
        n, h, w = tokens.shape
        side = self.cfg.copy_kernel
        r = side // 2
        kernel = self.copy_weight.exp()[0, 0]  # positive weights: a neighbour only ever adds evidence
        padded_tokens = F.pad(tokens.clamp(0, self.cfg.codebook_size - 1), (r, r, r, r))
        padded_keep = F.pad(keep_mask.to(kernel.dtype), (r, r, r, r))
        votes = kernel.new_zeros((n, h, w, self.cfg.codebook_size))
        for dy in range(side):
            for dx in range(side):
                index = padded_tokens[:, dy:dy + h, dx:dx + w, None]
                weight = padded_keep[:, dy:dy + h, dx:dx + w, None] * kernel[dy, dx]
                votes = votes.scatter_add(-1, index, weight)
        return votes

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (N,L,dim) -> logits (N,L,K), plus the copy gate's pre-activation as channel K+1 when
        there is a copy term: the transformer, the part `mridc.cloud.accel` exports."""
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if not self.cfg.copy_kernel:
            return self.head(x)
        return torch.cat([self.head(x), self.copy_gate(x)], dim=-1)


class WindowedPredictor(nn.Module):
    """Runs a token predictor on overlapping windows of a large grid, so that memory grows with the grid's area
    and not with its square (full attention over a 10 MP photo's 38,400 tokens would need ~47 GB).

    A grid that fits in one window is passed through unchanged (bit-identical logits). Otherwise each window
    gives the logits of its centre; the `overlap` tokens at its inner edges are taken from the neighbour, which
    sees them with context on both sides. The predictor trains on crops of 24x24 tokens with 2-D sin-cos
    positions, so a window is in its training distribution.
    """

    def __init__(self, predictor: nn.Module, window: int = 48, overlap: int = 8):
        super().__init__()
        if not 0 <= 2 * overlap < window:
            raise ValueError(f"overlap {overlap} must be less than half of window {window}")
        self.predictor = predictor
        self.window = window
        self.overlap = overlap
        self.cfg = predictor.cfg
        self.mask_id = getattr(predictor, "mask_id", None)

    @staticmethod
    def starts(size: int, window: int, overlap: int) -> list[int]:
        """Window starts covering [0, size): stride window - 2*overlap, the last one flush with the end."""
        if size <= window:
            return [0]
        stride = window - 2 * overlap
        out = list(range(0, size - window, stride)) + [size - window]
        return sorted(set(out))

    def forward(self, tokens: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        n, h, w = tokens.shape
        if h <= self.window and w <= self.window:
            return self.predictor(tokens, keep_mask)
        out = None
        ys = self.starts(h, self.window, self.overlap)
        xs = self.starts(w, self.window, self.overlap)
        for y in ys:
            for x in xs:
                wy, wx = min(self.window, h), min(self.window, w)
                logits = self.predictor(tokens[:, y:y + wy, x:x + wx], keep_mask[:, y:y + wy, x:x + wx])
                if out is None:
                    out = logits.new_empty((n, h, w, logits.shape[-1]))
                # keep the window's centre; its outer edge only where it touches the grid's edge
                y0 = 0 if y == ys[0] else self.overlap
                x0 = 0 if x == xs[0] else self.overlap
                y1 = wy if y == ys[-1] else wy - self.overlap
                x1 = wx if x == xs[-1] else wx - self.overlap
                out[:, y + y0:y + y1, x + x0:x + x1] = logits[:, y0:y1, x0:x1]
        return out


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, keep_mask: torch.Tensor,
                      label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy on the masked positions only."""
    masked = ~keep_mask
    if not masked.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[masked].float(), targets[masked], label_smoothing=label_smoothing)
