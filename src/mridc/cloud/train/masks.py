"""Training masks of the kinds MLM produces: uniform random at a random ratio, and map-shaped (smooth regions
dropped first, with noise), so the predictor and the diffusion model see what the edge will send."""

from __future__ import annotations

import math

import numpy as np
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


MASK_SOURCES = ("random", "edge", "mixed")


@torch.no_grad()
def tokens_and_quant_error(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,h,w) tokens (as `encode_indices`) and the edge's quantisation error, 1 - cosine to the chosen code."""
    z = tokenizer.encoder(images)
    sim = torch.einsum("ndhw,kd->nkhw", z, tokenizer.quantizer.normalized_codebook())
    best, idx = sim.max(dim=1)
    return idx, 1.0 - best


def _to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) in [-1, 1] -> (N,H,W,3) uint8, what the camera sees."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def edge_keep_masks(images: torch.Tensor, stride: int, tokens: torch.Tensor, quant_error: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, min_keep: float = 0.05, max_keep: float = 1.0,
                    config=None) -> torch.Tensor:
    """(N,h,w) bool keep masks from the edge's own policy: `MapPriority` (texture, quantisation error, token
    neighbours) and `MapGuidedSelection` (anchors, then by priority), at a cosine-schedule keep ratio.

    Key regions (user ROIs, detectors) are left out: crops have none, and a detector per crop is not cheap."""
    from mridc.edge.masking import MapGuidedSelection, MapPriority

    priority, policy = MapPriority(config), MapGuidedSelection(config)
    n = images.shape[0]
    h, w = images.shape[-2] // stride, images.shape[-1] // stride
    u = torch.rand(n, generator=generator)
    keep_ratio = (1 - torch.cos(u * math.pi / 2)).clamp(min_keep, max_keep)
    n_keep = (keep_ratio * h * w).round().long().clamp(1, h * w)
    rgb = _to_uint8_rgb(images)
    toks = tokens.cpu().numpy()
    qerr = quant_error.float().cpu().numpy() if quant_error is not None else None
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        score = priority.score(rgb[i], (h, w), stride, quant_error=None if qerr is None else qerr[i], tokens=toks[i])
        out[i] = policy.select(score, int(n_keep[i]), None).keep_mask
    return torch.from_numpy(out).to(images.device)


def keep_masks(images: torch.Tensor, stride: int, generator: torch.Generator | None = None, *, source: str = "random",
               tokens: torch.Tensor | None = None, quant_error: torch.Tensor | None = None, min_keep: float = 0.05,
               max_keep: float = 1.0) -> torch.Tensor:
    """Keep masks from `source`: "random" (`sample_keep_masks`), "edge" (`edge_keep_masks`, needs `tokens`) or
    "mixed" (each crop one or the other, half and half)."""
    if source == "random":
        return sample_keep_masks(images, stride, generator, min_keep=min_keep, max_keep=max_keep)
    if source not in MASK_SOURCES:
        raise ValueError(f"mask source must be one of {MASK_SOURCES}, got {source!r}")
    if tokens is None:
        raise ValueError(f"mask source {source!r} needs the crops' tokens")
    edge = edge_keep_masks(images, stride, tokens, quant_error, generator, min_keep=min_keep, max_keep=max_keep)
    if source == "edge":
        return edge
    rand = sample_keep_masks(images, stride, generator, min_keep=min_keep, max_keep=max_keep)
    use_edge = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(use_edge[:, None, None], edge, rand)
