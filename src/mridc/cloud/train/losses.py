"""Losses and cheap validation measures used during training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM on [-1, 1] images (pytorch-msssim; fewer scales for small crops)."""
    from pytorch_msssim import ms_ssim

    # pytorch-msssim asserts side > (win_size - 1) * 16: shrink the window for small crops.
    side = min(x.shape[-2:])
    win = 11 if side > 160 else 7 if side > 96 else 3
    return 1.0 - ms_ssim((x.float() + 1) / 2, (y.float() + 1) / 2, data_range=1.0, win_size=win)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of [-1, 1] images, per image."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def gradient_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute finite difference per image: blurry reconstructions have less of it."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return gx + gy


def selection_score(original: torch.Tensor, reconstruction: torch.Tensor) -> dict:
    """Checkpoint selection: PSNR, penalised when detail is missing (blur) or invented in excess.

    hf_ratio = gradient energy of the reconstruction / of the original; 1 is ideal.
    """
    p = psnr(original, reconstruction).mean()
    ratio = (gradient_energy(reconstruction) / gradient_energy(original).clamp_min(1e-6)).mean()
    score = p - 20 * torch.log10(ratio.clamp_min(1e-3)).abs()
    return {"psnr": float(p), "hf_ratio": float(ratio), "score": float(score)}


def adaptive_gan_weight(rec_loss, gan_loss, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: scale the adversarial gradient to the size of the reconstruction gradient at the last
    decoder layer, so neither dominates whatever their raw scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def feature_matching_loss(fake_feats, real_feats) -> torch.Tensor:
    return sum(F.l1_loss(f, r.detach()) for f, r in zip(fake_feats, real_feats)) / len(fake_feats)
