"""BPCG, part 1: a bidirectional token transformer that predicts masked tokens from the kept ones.

MaskGIT-style: embeddings of codebook indices plus one [MASK] embedding, 2-D sine-cosine positions (so one
model serves any grid size), full attention. The iterative sampler lives in `maskgit.py`.
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        return cls(**data)


def tiny_predictor_config(codebook_size: int = 64) -> PredictorConfig:
    return PredictorConfig(codebook_size=codebook_size, dim=32, depth=2, heads=2)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device=None) -> torch.Tensor:
    """(grid_h*grid_w, dim) fixed 2-D sine-cosine position embedding, raster order."""
    assert dim % 4 == 0
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float32),
        torch.arange(grid_w, device=device, dtype=torch.float32),
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

    def forward(self, tokens: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """tokens (N,h,w) int64, keep_mask (N,h,w) bool -> logits (N,h,w,K). Masked inputs are ignored."""
        n, h, w = tokens.shape
        inp = torch.where(keep_mask, tokens, torch.full_like(tokens, self.mask_id)).reshape(n, h * w)
        x = self.token_embed(inp) + sincos_2d(h, w, self.cfg.dim, tokens.device)[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).reshape(n, h, w, -1)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, keep_mask: torch.Tensor,
                      label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy on the masked positions only."""
    masked = ~keep_mask
    if not masked.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[masked].float(), targets[masked], label_smoothing=label_smoothing)
