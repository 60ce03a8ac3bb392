"""Train the bidirectional token predictor (BPCG part 1) on tokens of training crops from a frozen tokenizer.

`--mask-source` picks the keep masks it learns from: `random` (default; random ratio, half uniform and half
shaped by the crop's gradient map), `edge` (the camera's own selection: `mridc.edge` priority map and
map-guided selection at a random keep ratio, so it learns what the edge sends) or `mixed` (half of each).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mridc.cloud.data import CropSampler, default_train_sources, default_val_sources, parse_source
from mridc.cloud.predictor import BidirectionalTokenPredictor, PredictorConfig, masked_token_loss, tiny_predictor_config
from mridc.cloud.train.common import add_common_arguments, init_from_shipped, trainer_main
from mridc.cloud.train.masks import MASK_SOURCES, keep_masks, tokens_and_quant_error
from mridc.cloud.train.trainer import DataStreams, StepContext, Trainer, TrainerConfig, TrainTask
from mridc.cloud.zoo import load_model
from mridc.shared.zoo import default_shared_data_dir


@dataclass
class PredictorTrainConfig:
    tokenizer: str = "models/tokenizer.pt"  # the frozen tokenizer whose tokens it learns
    batch: int = 16
    crop: int = 256
    lr: float = 4e-4
    warmup: int = 500  # linear learning-rate warm-up steps
    tiny: bool = False
    init: str | None = None
    mask_source: str = "random"  # random | edge | mixed (see the module docstring)
    copy_kernel: int = 7  # neighbour copy term of a new model (0 = none); see mridc.cloud.predictor
    dropout: float = 0.1
    width: int = 256  # transformer width and depth of a new model
    depth: int = 6
    position_jitter: int = 32  # random shift of the position grid, so large grids stay in distribution
    data: list[str] | None = None
    shared_data: str | None = None


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, masks: torch.Tensor) -> dict:
    """Top-1/top-5 on the masked positions, beside the nearest-kept-token copy it has to beat."""
    from mridc.cloud.pipeline import nearest_kept_tokens

    model.eval()
    logits = model(tokens, masks).float()
    model.train()
    masked = ~masks
    target = tokens[masked]
    pred = logits[masked]
    top1 = (pred.argmax(-1) == target).float().mean()
    top5 = (pred.topk(5, dim=-1).indices == target[:, None]).any(-1).float().mean()
    nearest = (nearest_kept_tokens(tokens, masks)[masked] == target).float().mean()
    return {"top1": float(top1), "top5": float(top5), "nearest_top1": float(nearest),
            "loss": float(torch.nn.functional.cross_entropy(pred, target))}


class PredictorTask(TrainTask):
    name = "predictor"

    def __init__(self, cfg: PredictorTrainConfig):
        self.cfg = cfg

    def build(self, device: torch.device, resuming: bool) -> None:
        cfg = self.cfg
        self.tokenizer = load_model(cfg.tokenizer, "tokenizer", device)
        self.stride = self.tokenizer.cfg.stride
        mcfg = (tiny_predictor_config(self.tokenizer.cfg.codebook_size) if cfg.tiny
                else PredictorConfig(codebook_size=self.tokenizer.cfg.codebook_size, copy_kernel=cfg.copy_kernel,
                                     dropout=cfg.dropout, dim=cfg.width, depth=cfg.depth,
                                     heads=max(1, cfg.width // 32)))
        self.model = BidirectionalTokenPredictor(mcfg).to(device)
        self.model = init_from_shipped("predictor", cfg.init, device) or self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.96), weight_decay=0.01)

    def _tokens_and_masks(self, x: torch.Tensor, gen: torch.Generator, **limits) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.mask_source == "random":  # today's path, draws exactly as before
            return self.tokenizer.encode_indices(x), keep_masks(x, self.stride, gen, **limits)
        tokens, qerr = tokens_and_quant_error(self.tokenizer, x)
        return tokens, keep_masks(x, self.stride, gen, source=self.cfg.mask_source, tokens=tokens,
                                  quant_error=qerr, **limits)

    def prepare_data(self, device: torch.device) -> None:
        cfg = self.cfg
        shared = Path(cfg.shared_data) if cfg.shared_data else default_shared_data_dir()
        images = [img for spec in (cfg.data or default_train_sources(shared)) for img in parse_source(spec)]
        self.sampler = CropSampler(images, cfg.crop, device)
        # Held-out images only, on grids twice the training crop's side: the full frames it fills are larger
        # than its crops, so selection must reward what carries over to them.
        val_imgs = CropSampler([i for s in default_val_sources(shared) for i in parse_source(s)],
                               2 * cfg.crop, device, min_scale=0.3).sample(16, random.Random(7))
        with torch.no_grad():
            self.val_tokens, self.val_masks = self._tokens_and_masks(
                val_imgs, torch.Generator().manual_seed(7), min_keep=0.3, max_keep=0.75)

    @torch.no_grad()
    def sample(self, streams: DataStreams) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        x = self.sampler.sample(self.cfg.batch, streams.rng)
        jitter = self.cfg.position_jitter
        offset = (streams.rng.randint(0, jitter), streams.rng.randint(0, jitter)) if jitter else (0, 0)
        return (*self._tokens_and_masks(x, streams.gen), offset)

    def train_step(self, batch, ctx: StepContext) -> dict:
        tokens, masks, offset = batch
        lr = self.cfg.lr * min(1.0, (ctx.step + 1) / self.cfg.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with ctx.autocast():
            logits = self.model(tokens, masks, position_offset=offset)
        loss = masked_token_loss(logits, tokens, masks)
        ctx.optimize(loss, self.opt)
        return {"loss": loss, "lr": lr}

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        metrics = evaluate(model, self.val_tokens, self.val_masks)
        return {**metrics, "score": metrics["top1"]}

    def describe(self, m: dict) -> str:
        return f"top1 {m['top1']:.3f} top5 {m['top5']:.3f} (nearest copy {m['nearest_top1']:.3f})"

    def best_meta(self, step: int, metrics: dict) -> dict:
        return {"step": step, "val": metrics, "tokenizer": str(self.cfg.tokenizer), "masks": self.cfg.mask_source}



def train_predictor(args: argparse.Namespace) -> Path:
    trainer = TrainerConfig(out=args.out, steps=args.steps, minutes=args.minutes, eval_every=args.eval_every,
                            seed=args.seed, device=args.device, ema=args.ema)
    task = PredictorTrainConfig(tokenizer=args.tokenizer, batch=args.batch, crop=args.crop, lr=args.lr,
                                tiny=args.tiny, init=args.init, mask_source=args.mask_source, data=args.data,
                                shared_data=args.shared_data, copy_kernel=args.copy_kernel, dropout=args.dropout,
                                position_jitter=args.position_jitter, width=args.width, depth=args.depth)
    return Trainer(trainer, PredictorTask(task)).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, kind="predictor", batch=16, crop=256, lr=0.0004, frozen_tokenizer=True)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated/shipped weights (0 = off)")
    p.add_argument("--mask-source", choices=MASK_SOURCES, default="random",
                   help="training masks: random (default), edge (the camera's selection policy) or mixed")
    p.add_argument("--copy-kernel", type=int, default=7,
                   help="side of the neighbour copy window of a new model (odd; 0 = no copy term)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of a new model")
    p.add_argument("--width", type=int, default=256, help="transformer width of a new model (heads: width/32)")
    p.add_argument("--depth", type=int, default=6, help="transformer blocks of a new model")
    p.add_argument("--position-jitter", type=int, default=32,
                   help="random shift of the position grid in training, in tokens (0 = off)")


def main(argv=None) -> int:
    return trainer_main(__doc__, add_arguments, train_predictor, argv)


if __name__ == "__main__":
    raise SystemExit(main())
