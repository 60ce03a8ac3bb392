"""Noise schedule and the DDIM update rule (x0-parameterised), independent of any network."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DDIMScheduler:
    num_train_timesteps: int = 1000

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Cosine schedule (Nichol & Dhariwal 2021), t in [0, T]."""
        s = 0.008
        x = (t.float() / self.num_train_timesteps + s) / (1 + s)
        return (torch.cos(x * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(1e-5, 1.0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def timesteps(self, start: float, steps: int) -> list[int]:
        """Descending integer timesteps from start*T to 0 (exclusive) in `steps` DDIM steps."""
        t_start = round(start * (self.num_train_timesteps - 1))
        if t_start <= 0 or steps <= 0:
            return []
        return sorted({round(t_start * (i + 1) / steps) for i in range(steps)}, reverse=True)

    def step(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step from t to t_prev (t_prev = 0 returns the clean prediction)."""
        if t_prev <= 0:
            return x0_pred
        ab_t = self.alpha_bar(torch.tensor(t)).item()
        ab_prev = self.alpha_bar(torch.tensor(t_prev)).item()
        eps = (x_t - math.sqrt(ab_t) * x0_pred) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        direction = math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        x_prev = math.sqrt(ab_prev) * x0_pred + direction
        if sigma > 0:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
            x_prev = x_prev + sigma * noise
        return x_prev
