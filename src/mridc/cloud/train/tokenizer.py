"""Train the VQ tokenizer: L1 + MS-SSIM reconstruction, VQ losses, then a patch GAN with an adaptive weight.

The GAN is phased in carefully, because a naive fixed-weight GAN made such a model worse here:
1. reconstruction only until `gan_start` (a fraction of the budget);
2. the discriminator alone trains for `disc_warmup` steps (the generator gets no adversarial gradient);
3. the adversarial term is ramped in over `gan_ramp` steps, scaled by VQGAN's adaptive weight, plus a
   discriminator feature-matching loss; the discriminator is regularised with a lazy R1 penalty.
The checkpoint that scores best on held-out frames (PSNR penalised for lost or invented detail) is kept as
`best.pt`, not the last one.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mridc.cloud.data import CropSampler, default_train_sources, default_val_sources, parse_source
from mridc.cloud.discriminator import PatchDiscriminator, hinge_d_loss, r1_penalty
from mridc.cloud.tokenizer import TokenizerConfig, VQTokenizer, tiny_tokenizer_config
from mridc.cloud.train.losses import adaptive_gan_weight, feature_matching_loss, ms_ssim_loss, selection_score
from mridc.cloud.train.trainer import DataStreams, StepContext, Trainer, TrainerConfig, TrainTask
from mridc.cloud.zoo import load_checkpoint, load_model, save_checkpoint
from mridc.shared.zoo import default_shared_data_dir


@dataclass
class TokenizerTrainConfig:
    """The tokenizer's recipe (the loop's budget, seed, AMP, EMA are `TrainerConfig`'s)."""

    batch: int = 8
    crop: int = 256
    lr: float = 2e-4
    # Cosine decay of the autoencoder's lr from this fraction of the budget to its end (to 5 %); 1.0 = constant.
    # A run can be resumed with a new value: the schedule reads the budget's progress, not the step.
    lr_decay_from: float = 1.0
    disc_lr: float = 2e-4
    msssim_weight: float = 0.3
    gan_start: float = 0.35  # fraction of the budget
    disc_warmup: int = 300
    gan_ramp: int = 1000
    gan_weight: float = 0.5
    feature_weight: float = 1.0
    r1_gamma: float = 1.0
    r1_every: int = 8
    restart_every: int = 100
    # A code is dead when its usage (an EMA over ~100 steps of the tokens it got per step; the mean is
    # tokens/codebook size) falls under this. 1e-3 lets a code live on one token in a thousand steps.
    restart_threshold: float = 1e-3
    restart_until: float = 0.8
    betas: tuple[float, float] = (0.5, 0.9)  # GAN-style; (0.9, 0.99) converges faster for reconstruction only
    tiny: bool = False
    min_scale: float = 0.2  # smallest crop scale (a crop covers crop/min_scale source pixels)
    select: str = "detail"  # checkpoint score: "detail" (PSNR penalised by gradient-energy error) or "psnr"
    init: str | None = None  # starting weights (a shipped tokenizer file) instead of scratch
    init_disc: str | None = None  # discriminator weights to continue adversarial training (with init)
    init_gan_on: bool = False  # with init: the GAN phase starts at once
    freeze_encoder: bool = False  # decoder-only fine-tuning: tokens, codebook and model id stay as shipped
    data: list[str] | None = None  # training sources (default: the shared data's training split)
    val: list[str] | None = None  # validation images (default: held-out camera frames + photo crops)
    shared_data: str | None = None
    model: dict = field(default_factory=dict)


def build_val_set(shared: Path, device: torch.device, crop: int, val_sources: list[str] | None = None) -> torch.Tensor:
    """Fixed crops for checkpoint selection: held-out camera frames + photo crops (or `val_sources`)."""
    rng = random.Random(1234)
    if val_sources:
        frames = [img for spec in val_sources for img in parse_source(spec)]
        return CropSampler(frames, crop, device, min_scale=0.5).sample(8, rng)
    frames = [img for spec in default_val_sources(shared) for img in parse_source(spec)]
    sampler = CropSampler(frames, crop, device, min_scale=0.5)
    photos = CropSampler(parse_source(str(shared / "photos/train")), crop, device, min_scale=0.3)
    return torch.cat([sampler.sample(6, rng), photos.sample(6, rng)])


@torch.no_grad()
def evaluate(model: VQTokenizer, val: torch.Tensor, select: str = "detail") -> dict:
    model.eval()
    recs, idx_all = [], []
    for i in range(0, len(val), 4):
        out = model(val[i:i + 4])
        recs.append(out.reconstruction.float().clamp(-1, 1))
        idx_all.append(out.indices.flatten())
    model.train()
    rec = torch.cat(recs)
    idx = torch.cat(idx_all)
    counts = torch.bincount(idx, minlength=model.cfg.codebook_size).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    result = selection_score(val, rec)
    if select == "psnr":  # the gradient-energy term can reward invented texture over fidelity
        result["score"] = result["psnr"]
    result.update(codebook_perplexity=float(perplexity), codes_used=float((counts > 0).float().mean()))
    return result


class TokenizerTask(TrainTask):
    """L1 + MS-SSIM + VQ losses; the GAN phase as the module docstring describes it."""

    name = "tokenizer"
    postfix_keys = ("l1", "d_loss", "adv_weight")

    def __init__(self, cfg: TokenizerTrainConfig):
        self.cfg = cfg
        self.gan_start_step: int | None = None
        self.gan_on = False

    def build(self, device: torch.device, resuming: bool) -> None:
        cfg = self.cfg
        self.device = device
        mcfg = tiny_tokenizer_config() if cfg.tiny else TokenizerConfig()
        if cfg.model:  # architecture overrides, e.g. {"codebook_ema": 0.99}
            mcfg = TokenizerConfig.from_dict({**mcfg.to_dict(), **cfg.model})
        self.model = VQTokenizer(mcfg).to(device)
        self.disc = PatchDiscriminator(width=16 if cfg.tiny else 64).to(device)
        if not resuming and cfg.init:
            self.model = load_model(cfg.init, "tokenizer", device).train()
            if cfg.init_disc and Path(cfg.init_disc).exists():
                self.disc.load_state_dict(load_checkpoint(cfg.init_disc, "discriminator", device)["state_dict"])
                self.gan_start_step = -cfg.disc_warmup - cfg.gan_ramp  # GAN already trained: no warm-up again
            print(f"initialised weights from {cfg.init}")
            if self.gan_start_step is None and cfg.init_gan_on:
                self.gan_start_step = 0
        params = self.model.parameters()
        if cfg.freeze_encoder:
            # Decoder-only fine-tuning: tokens, codebook and model id stay exactly as shipped, so the edge bundle
            # and the predictor trained on these tokens remain valid.
            for module in (self.model.encoder, self.model.quantizer):
                for param in module.parameters():
                    param.requires_grad_(False)
            params = self.model.decoder.parameters()
            cfg.restart_until = 0.0
        self.opt_g = torch.optim.Adam([p for p in params if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    def prepare_data(self, device: torch.device) -> None:
        cfg = self.cfg
        shared = Path(cfg.shared_data) if cfg.shared_data else default_shared_data_dir()
        images = [img for spec in (cfg.data or default_train_sources(shared)) for img in parse_source(spec)]
        self.sampler = CropSampler(images, cfg.crop, device, min_scale=cfg.min_scale)
        self.val = build_val_set(shared, device, cfg.crop, cfg.val)
        print(f"tokenizer: {sum(p.numel() for p in self.model.encoder.parameters())/1e6:.2f}M encoder params, "
              f"{sum(p.numel() for p in self.model.decoder.parameters())/1e6:.2f}M decoder params, "
              f"{len(images)} training images, device {device}")

    def sample(self, streams: DataStreams) -> torch.Tensor:
        return self.sampler.sample(self.cfg.batch, streams.rng)

    def train_step(self, x: torch.Tensor, ctx: StepContext) -> dict:
        cfg, model, disc, step = self.cfg, self.model, self.disc, ctx.step
        if self.gan_start_step is None and ctx.progress >= cfg.gan_start:
            self.gan_start_step = step
        for group in self.opt_g.param_groups:
            group["lr"] = cfg.lr * lr_factor(ctx.progress, cfg.lr_decay_from)
        with ctx.autocast():
            out = model(x)
        rec = out.reconstruction.float()
        l1 = (rec - x).abs().mean()
        ssim_l = ms_ssim_loss(rec, x)
        rec_loss = l1 + cfg.msssim_weight * ssim_l
        loss = rec_loss + out.vq_loss.float()

        self.gan_on = gan_on = self.gan_start_step is not None and step >= self.gan_start_step + cfg.disc_warmup
        adv_w = torch.tensor(0.0)
        if gan_on:
            ramp = min(1.0, (step - self.gan_start_step - cfg.disc_warmup) / cfg.gan_ramp)
            with ctx.autocast():
                fake_logits, fake_feats = disc(rec)
                with torch.no_grad():
                    _, real_feats = disc(x)
            g_adv = -fake_logits.float().mean()
            fm = feature_matching_loss([f.float() for f in fake_feats], [f.float() for f in real_feats])
            adv_w = adaptive_gan_weight(rec_loss, g_adv, model.decoder.last_layer_weight) * cfg.gan_weight * ramp
            loss = loss + adv_w * g_adv + cfg.feature_weight * ramp * fm
        ctx.optimize(loss, self.opt_g, [p for p in model.parameters() if p.requires_grad])

        d_loss = torch.tensor(0.0)
        if self.gan_start_step is not None and step >= self.gan_start_step:
            r1 = step % cfg.r1_every == 0
            real = x.detach().requires_grad_(r1)
            with ctx.autocast():
                real_logits, _ = disc(real)
                fake_logits, _ = disc(rec.detach())
            d_loss = hinge_d_loss(real_logits.float(), fake_logits.float())
            if r1:  # lazy R1: every r1_every steps, scaled up to match
                d_loss = d_loss + cfg.r1_gamma * cfg.r1_every * 0.5 * r1_penalty(real_logits.float(), real)
            ctx.optimize(d_loss, self.opt_d, clip=False)

        restarted = 0
        if step % cfg.restart_every == 0 and step > 0 and ctx.progress < cfg.restart_until:
            restarted = model.quantizer.restart_dead_codes(out.z, cfg.restart_threshold)
        return {"l1": l1, "msssim_loss": ssim_l, "vq": out.vq_loss, "d_loss": d_loss, "adv_weight": adv_w,
                "restarted": restarted}

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        return evaluate(model, self.val, self.cfg.select)

    def describe(self, m: dict) -> str:
        return (f"psnr {m['psnr']:.2f} hf {m['hf_ratio']:.2f} score {m['score']:.2f} "
                f"perplexity {m['codebook_perplexity']:.0f} used {m['codes_used']:.2f}")

    def best_meta(self, step: int, metrics: dict) -> dict:
        meta = {"step": step, "val": metrics, "gan_active": bool(self.gan_on)}
        if self.cfg.init:
            meta["init"] = str(self.cfg.init)
        return meta

    def evaluate_initial(self) -> bool:
        return bool(self.cfg.init)  # GAN fine-tuning must beat the starting weights to be kept

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "disc": self.disc.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "gan_start_step": self.gan_start_step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.gan_start_step = state.get("gan_start_step")

    def after_checkpoint(self, run_dir: Path) -> None:
        save_checkpoint(run_dir / "disc.pt", "discriminator", self.disc.state_dict())


def lr_factor(progress: float, decay_from: float, floor: float = 0.05) -> float:
    """1 until `decay_from` of the budget, then a cosine down to `floor` at its end."""
    if decay_from >= 1.0 or progress <= decay_from:
        return 1.0
    t = min(1.0, (progress - decay_from) / (1.0 - decay_from))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def configs_from_args(args: argparse.Namespace) -> tuple[TrainerConfig, TokenizerTrainConfig]:
    trainer = TrainerConfig(out=args.out, steps=args.steps, minutes=args.minutes, eval_every=args.eval_every,
                            seed=args.seed, device=args.device, ema=args.ema, tf32=True)
    task = TokenizerTrainConfig(batch=args.batch, crop=args.crop, lr=args.lr, lr_decay_from=args.lr_decay_from,
                                gan_start=args.gan_start,
                                disc_warmup=args.disc_warmup, gan_ramp=args.gan_ramp, tiny=args.tiny,
                                min_scale=args.min_scale, select=args.select, init=args.init,
                                init_disc=args.init_disc, init_gan_on=args.init_gan_on,
                                freeze_encoder=args.freeze_encoder, data=args.data, val=args.val,
                                shared_data=args.shared_data, betas=tuple(args.betas),
                                restart_threshold=args.restart_threshold,
                                model={"codebook_ema": args.codebook_ema} if args.codebook_ema else {})
    return trainer, task


def train_tokenizer(args: argparse.Namespace) -> Path:
    trainer_cfg, task_cfg = configs_from_args(args)
    return Trainer(trainer_cfg, TokenizerTask(task_cfg)).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="*",
                   help="image folders/files or VIDEO:FIRST-LAST[:EVERY] (default: ../shared/data training split)")
    p.add_argument("--shared-data", help="reference data folder (default ../shared/data or $MRIDC_DATA)")
    p.add_argument("--val", nargs="*",
                   help="validation images for checkpoint selection (default: held-out vtest frames)")
    p.add_argument("--out", required=True, help="run folder: checkpoints (last.pt resumes exactly), best.pt, log.jsonl")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (default 20000)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-time budget; stops at whichever comes first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--gan-start", type=float, default=0.35, help="fraction of the budget before the GAN phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--init", help="start from these weights (e.g. models/tokenizer.pt) instead of scratch")
    p.add_argument("--init-disc", help="discriminator weights to continue adversarial training")
    p.add_argument("--init-gan-on", action="store_true", help="with --init: start the GAN phase at once")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only (keeps tokens, codebook and model id; with --init)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-decay-from", type=float, default=1.0, metavar="F",
                   help="cosine-decay the lr over the budget's last part, from fraction F to the end (1 = constant); "
                        "a resumed run may set it")
    p.add_argument("--disc-warmup", type=int, default=300, help="steps the discriminator trains alone first")
    p.add_argument("--gan-ramp", type=int, default=1000, help="steps over which the adversarial weight ramps in")
    p.add_argument("--min-scale", type=float, default=0.2,
                   help="smallest random crop scale (0.2: a 256 crop may cover 1280 source pixels)")
    p.add_argument("--select", choices=["detail", "psnr"], default="detail",
                   help="checkpoint selection score on the held-out crops")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated/shipped weights (0 = off)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9), metavar=("B1", "B2"),
                   help="Adam betas of the autoencoder (default 0.5 0.9, GAN-style; 0.9 0.99 for reconstruction)")
    p.add_argument("--codebook-ema", type=float, default=0.0,
                   help="from scratch: EMA decay of a k-means codebook update, e.g. 0.99 (default 0: gradient)")
    p.add_argument("--restart-threshold", type=float, default=1e-3,
                   help="codes whose recent usage (tokens per step, EMA) is under this are restarted from encoder "
                        "outputs (default 1e-3; 0.03 restarts codes used less than once in ~30 steps)")
    p.add_argument("--tiny", action="store_true", help="tiny model (tests, smoke runs)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    train_tokenizer(p.parse_args(argv))


if __name__ == "__main__":
    main()
