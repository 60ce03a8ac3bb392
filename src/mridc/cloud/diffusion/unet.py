"""A small conditional U-Net that predicts the clean residual (image minus tokenizer decode).

Conditioning: the tokenizer decode of the completed token grid (3 channels) and a trust map (1 channel:
1 where the token was sent by the camera, the predictor's confidence where it was filled in the cloud), so the
model can stay close to the decode where tokens are real and be freer where they were predicted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    cond_channels: int = 4  # decode RGB + trust map
    time_dim: int = 128
    patch: int = 2  # space-to-depth factor: 4x cheaper than running the top level at full resolution
    residual_scale: float = 0.25  # the residual is divided by this so it has roughly unit spread

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def tiny_unet_config() -> UNetConfig:
    return UNetConfig(widths=(8, 16), blocks_per_level=1, time_dim=16, patch=2)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class TimeResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, in_ch // 4) or 1, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(min(8, out_ch // 4) or 1, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(),
                                      nn.Linear(cfg.time_dim, cfg.time_dim))
        self.conv_in = nn.Conv2d((3 + cfg.cond_channels) * cfg.patch**2, w[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = w[0]
        for i, width in enumerate(w):
            self.down.append(nn.ModuleList(TimeResBlock(ch if j == 0 else width, width, cfg.time_dim)
                                           for j in range(cfg.blocks_per_level)))
            ch = width
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < len(w) - 1 else nn.Identity())
        self.mid = TimeResBlock(ch, ch, cfg.time_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, width in reversed(list(enumerate(w))):
            self.up.append(nn.ModuleList(TimeResBlock((ch + width) if j == 0 else width, width, cfg.time_dim)
                                         for j in range(cfg.blocks_per_level)))
            ch = width
            self.upsample.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
        self.norm_out = nn.GroupNorm(min(8, w[0] // 4) or 1, w[0])
        self.conv_out = nn.Conv2d(w[0], 3 * cfg.patch**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def multiple(self) -> int:
        return self.cfg.patch * 2 ** (len(self.cfg.widths) - 1)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        h = self.conv_in(F.pixel_unshuffle(torch.cat([noisy, cond], dim=1), self.cfg.patch))
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
            h = up(h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.cfg.patch)
