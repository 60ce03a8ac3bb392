"""Train the conditional diffusion model (BPCG part 2): it learns the residual between a training crop and the
frozen tokenizer's decode of its tokens, where some tokens were replaced the way a predictor gets them wrong,
with a trust map telling which tokens were real."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mridc.cloud.data import CropSampler, default_train_sources, default_val_sources, parse_source
from mridc.cloud.diffusion.pipeline import diffusion_condition
from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.diffusion.unet import ConditionalUNet, UNetConfig, tiny_unet_config
from mridc.cloud.train.common import add_common_arguments, init_from_shipped, trainer_main
from mridc.cloud.train.masks import sample_keep_masks
from mridc.cloud.train.trainer import DataStreams, StepContext, Trainer, TrainerConfig, TrainTask
from mridc.cloud.zoo import load_model
from mridc.shared.zoo import default_shared_data_dir


@dataclass
class DiffusionTrainConfig:
    tokenizer: str = "models/tokenizer.pt"  # the frozen tokenizer whose decodes it refines
    batch: int = 8
    crop: int = 128
    lr: float = 2e-4
    tiny: bool = False
    init: str | None = None
    select: str = "last"  # best.pt: "last" (the latest EMA weights, as before) or "val" (lowest held-out loss)
    data: list[str] | None = None
    shared_data: str | None = None


def corrupt_masked_tokens(tokens: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Masked positions get a neighbour's token half of the time: plausible but wrong, like a predictor's miss."""
    n, h, w = tokens.shape
    dy = torch.randint(-2, 3, (n, h, w), generator=generator).to(tokens.device)
    dx = torch.randint(-2, 3, (n, h, w), generator=generator).to(tokens.device)
    ys = (torch.arange(h, device=tokens.device)[None, :, None] + dy).clamp(0, h - 1)
    xs = (torch.arange(w, device=tokens.device)[None, None, :] + dx).clamp(0, w - 1)
    shifted = tokens[torch.arange(n, device=tokens.device)[:, None, None], ys, xs]
    wrong = (~keep) & (torch.rand(n, h, w, generator=generator).to(tokens.device) < 0.5)
    return torch.where(wrong, shifted, tokens)


class DiffusionTask(TrainTask):
    """Noise prediction on the residual; the trainer keeps the EMA (0.999 by default) that ships."""

    name = "diffusion"

    def __init__(self, cfg: DiffusionTrainConfig):
        self.cfg = cfg

    def build(self, device: torch.device, resuming: bool) -> None:
        cfg = self.cfg
        self.device = device
        self.tokenizer = load_model(cfg.tokenizer, "tokenizer", device)
        self.stride = self.tokenizer.cfg.stride
        self.model = ConditionalUNet(tiny_unet_config() if cfg.tiny else UNetConfig()).to(device)
        self.model = init_from_shipped("diffusion", cfg.init, device) or self.model
        self.scheduler = DDIMScheduler()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)

    @torch.no_grad()
    def _batch(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        tokens = self.tokenizer.encode_indices(x)
        keep = sample_keep_masks(x, self.stride, gen, min_keep=0.05)
        decoded = self.tokenizer.decode_indices(corrupt_masked_tokens(tokens, keep, gen)).clamp(-1, 1)
        cond = diffusion_condition(decoded, keep.float())
        residual = (x - decoded) / self.model.cfg.residual_scale
        t = torch.randint(1, self.scheduler.num_train_timesteps, (x.shape[0],), generator=gen).to(x.device)
        noise = torch.randn(residual.shape, generator=gen).to(x.device)
        return self.scheduler.add_noise(residual, noise, t), t, cond, residual

    def prepare_data(self, device: torch.device) -> None:
        cfg = self.cfg
        shared = Path(cfg.shared_data) if cfg.shared_data else default_shared_data_dir()
        images = [img for spec in (cfg.data or default_train_sources(shared)) for img in parse_source(spec)]
        self.sampler = CropSampler(images, cfg.crop, device)
        # A fixed held-out batch (its own streams): the denoising loss of the evaluated weights.
        val_imgs = CropSampler([i for s in default_val_sources(shared) for i in parse_source(s)] + images[:3],
                               cfg.crop, device, min_scale=0.5).sample(8, random.Random(7))
        self.val = self._batch(val_imgs, torch.Generator().manual_seed(7))

    def sample(self, streams: DataStreams) -> tuple[torch.Tensor, ...]:
        return self._batch(self.sampler.sample(self.cfg.batch, streams.rng), streams.gen)

    def train_step(self, batch, ctx: StepContext) -> dict:
        noisy, t, cond, residual = batch
        with ctx.autocast():
            pred = self.model(noisy, t, cond)
        loss = F.mse_loss(pred.float(), residual)
        ctx.optimize(loss, self.opt)
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        noisy, t, cond, residual = self.val
        was_training = model.training
        model.eval()
        losses = [F.mse_loss(model(noisy[i:i + 4], t[i:i + 4], cond[i:i + 4]).float(), residual[i:i + 4])
                  for i in range(0, len(noisy), 4)]
        model.train(was_training)
        val_loss = float(torch.stack(losses).mean())
        return {"val_loss": val_loss, "score": float(step) if self.cfg.select == "last" else -val_loss}

    def describe(self, m: dict) -> str:
        return f"val loss {m['val_loss']:.4f}"

    def best_meta(self, step: int, metrics: dict) -> dict:
        return {"step": step, "val": metrics, "tokenizer": str(self.cfg.tokenizer)}



def train_diffusion(args: argparse.Namespace) -> Path:
    trainer = TrainerConfig(out=args.out, steps=args.steps, minutes=args.minutes, eval_every=args.eval_every,
                            seed=args.seed, device=args.device, ema=args.ema)
    task = DiffusionTrainConfig(tokenizer=args.tokenizer, batch=args.batch, crop=args.crop, lr=args.lr,
                                tiny=args.tiny, init=args.init, select=args.select, data=args.data,
                                shared_data=args.shared_data)
    return Trainer(trainer, DiffusionTask(task)).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, kind="diffusion", batch=8, crop=128, lr=0.0002, frozen_tokenizer=True)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--save-every", "--eval-every", dest="eval_every", type=int, default=500,
                   help="steps between evaluations and checkpoint saves")
    p.add_argument("--select", choices=["last", "val"], default="last",
                   help="best.pt: the latest EMA weights (last) or those with the lowest held-out loss (val)")


def main(argv=None) -> int:
    return trainer_main(__doc__, add_arguments, train_diffusion, argv)


if __name__ == "__main__":
    raise SystemExit(main())
