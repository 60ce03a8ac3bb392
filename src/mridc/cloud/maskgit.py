"""Iterative bidirectional decoding (MaskGIT sampler), independent of the network it drives.

`fill_masked_tokens(predict, tokens, keep_mask, steps, seed)` takes any callable
`predict(tokens, known_mask) -> logits (N,h,w,K)` so the same sampler serves a tiny test network and the
shipped model. Kept tokens are never overwritten; the result is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def fill_masked_tokens(
    predict: Predict,
    tokens: torch.Tensor,
    keep_mask: torch.Tensor,
    steps: int = 8,
    seed: int = 0,
    temperature: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the masked positions of (N,h,w) `tokens` in `steps` confidence-ordered rounds (cosine schedule).

    temperature 0 = greedy (most likely token, the fidelity end); > 0 samples tokens and adds Gumbel noise
    to the confidence ordering, seeded. Returns (completed tokens, confidence of each token: 1 for kept).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    known = keep_mask.clone()
    current = torch.where(known, tokens, torch.zeros_like(tokens))
    confidence = known.float().clone()
    n, h, w = tokens.shape
    n_masked_start = (~known).flatten(1).sum(1)  # per image
    steps = max(1, int(steps))
    for step in range(steps):
        if known.all():
            break
        logits = predict(current, known).float()
        probs = torch.softmax(logits, dim=-1)
        if temperature > 0:
            flat = probs.reshape(-1, probs.shape[-1]).cpu()
            noisy = torch.softmax(torch.log(flat + 1e-9) / temperature, dim=-1)
            sampled = torch.multinomial(noisy, 1, generator=generator).reshape(n, h, w).to(tokens.device)
        else:
            sampled = probs.argmax(dim=-1)
        sampled_prob = probs.gather(-1, sampled[..., None])[..., 0]
        score = torch.log(sampled_prob + 1e-9)
        if temperature > 0:
            gumbel = -torch.log(-torch.log(torch.rand(score.shape, generator=generator) + 1e-9) + 1e-9)
            score = score + temperature * gumbel.to(score.device) * (1.0 - (step + 1) / steps)
        score = score.masked_fill(known, float("inf"))
        # How many positions stay masked after this round, per image (cosine schedule).
        ratio = math.cos(math.pi / 2 * (step + 1) / steps)
        remain = torch.floor(n_masked_start.float() * ratio).long()
        flat_score = score.flatten(1)
        order = flat_score.argsort(dim=1)  # ascending: lowest confidence first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(h * w, device=tokens.device).expand(n, -1))
        still_masked = (rank < remain[:, None]).reshape(n, h, w) & ~known
        newly = ~known & ~still_masked
        current = torch.where(newly, sampled, current)
        confidence = torch.where(newly, sampled_prob, confidence)
        known = known | newly
    return current, confidence
