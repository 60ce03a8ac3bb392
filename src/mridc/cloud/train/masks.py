"""Training masks of the kinds MLM produces: uniform random at a random ratio, and map-shaped (smooth regions
dropped first, with noise), so the predictor and the diffusion model see what the edge will send."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_gradient_energy(images: torch.Tensor, stride: int) -> torch.Tensor:
    """(N,3,H,W) in [-1,1] -> (N,h,w) mean absolute gradient per token: the cheap complexity map."""
    gray = images.mean(1, keepdim=True)
    gx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1, 0, 0))
    gy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    return F.avg_pool2d(gx + gy, stride)[:, 0]


def sample_keep_masks(images: torch.Tensor, stride: int, generator: torch.Generator | None = None,
                      min_keep: float = 0.05, max_keep: float = 1.0, map_share: float = 0.5) -> torch.Tensor:
    """(N,h,w) bool keep masks; keep ratio from MaskGIT's cosine schedule clipped to [min_keep, max_keep]."""
    n = images.shape[0]
    h, w = images.shape[-2] // stride, images.shape[-1] // stride
    device = images.device
    u = torch.rand(n, generator=generator).to(device)
    keep_ratio = (1 - torch.cos(u * math.pi / 2)).clamp(min_keep, max_keep)
    noise = torch.rand(n, h, w, generator=generator).to(device)
    use_map = (torch.rand(n, generator=generator) < map_share).to(device)
    energy = token_gradient_energy(images, stride)
    energy = energy / energy.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
    priority = torch.where(use_map[:, None, None], energy + 0.3 * noise, noise)
    n_keep = (keep_ratio * h * w).round().long().clamp(1, h * w)
    order = priority.flatten(1).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=device).expand(n, -1))
    return (rank < n_keep[:, None]).reshape(n, h, w)
