"""Composes a conditional U-Net and a DDIM scheduler into the realism knob.

realism r in [0, 1] chooses where sampling starts (SDEdit-style): the residual over the tokenizer decode
starts at zero, is noised to timestep r*T and denoised back in ceil(r*steps) DDIM steps. r = 0 returns the
deterministic tokenizer decode; r = 1 samples the residual from pure noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.diffusion.unet import ConditionalUNet


def diffusion_condition(decoded: torch.Tensor, trust: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) decode in [-1,1] + (N,h,w) trust in [0,1] -> (N,4,H,W) conditioning."""
    trust_up = F.interpolate(trust[:, None].float(), size=decoded.shape[-2:], mode="nearest")
    return torch.cat([decoded, trust_up * 2 - 1], dim=1)


class ResidualDiffusionPipeline:
    def __init__(self, unet: ConditionalUNet, scheduler: DDIMScheduler | None = None):
        self.unet = unet
        self.scheduler = scheduler or DDIMScheduler()

    @torch.no_grad()
    def __call__(self, decoded: torch.Tensor, trust: torch.Tensor, realism: float, steps: int = 8,
                 seed: int = 0, eta: float = 0.0) -> torch.Tensor:
        realism = float(min(max(realism, 0.0), 1.0))
        n_steps = math.ceil(realism * steps)
        timesteps = self.scheduler.timesteps(realism, n_steps)
        if not timesteps:
            return decoded
        scale = self.unet.cfg.residual_scale
        cond = diffusion_condition(decoded, trust)
        # One generator per image, so an image decodes the same alone or in a batch.
        noise = torch.stack([torch.randn(decoded.shape[1:], generator=torch.Generator().manual_seed(int(seed)))
                             for _ in range(decoded.shape[0])]).to(decoded.device)
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
        t0 = torch.full((decoded.shape[0],), timesteps[0], device=decoded.device)
        x = self.scheduler.add_noise(torch.zeros_like(decoded), noise, t0)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            tt = torch.full((decoded.shape[0],), t, device=decoded.device)
            x0 = self.unet(x, tt, cond).clamp(-4, 4)
            x = self.scheduler.step(x0, x, t, t_prev, eta=eta, generator=generator)
        return (decoded + x * scale).clamp(-1, 1)
