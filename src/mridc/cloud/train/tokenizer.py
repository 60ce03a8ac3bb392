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
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mridc.cloud.data import CropSampler, default_train_sources, default_val_sources, parse_source
from mridc.cloud.discriminator import PatchDiscriminator, hinge_d_loss, r1_penalty
from mridc.cloud.tokenizer import TokenizerConfig, VQTokenizer, tiny_tokenizer_config
from mridc.cloud.train.common import (
    Budget,
    JsonlLog,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mridc.cloud.train.losses import adaptive_gan_weight, feature_matching_loss, ms_ssim_loss, selection_score
from mridc.cloud.zoo import atomic_save, load_checkpoint, load_model, save_checkpoint, save_model
from mridc.shared.zoo import default_shared_data_dir


@dataclass
class TokenizerTrainConfig:
    steps: int = 20000
    minutes: float = 0.0
    batch: int = 8
    crop: int = 256
    lr: float = 2e-4
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
    restart_until: float = 0.8
    eval_every: int = 500
    save_every: int = 500
    seed: int = 0
    amp: bool = True
    tiny: bool = False
    min_scale: float = 0.2  # smallest crop scale (a crop covers crop/min_scale source pixels)
    select: str = "detail"  # checkpoint score: "detail" (PSNR penalised by gradient-energy error) or "psnr"
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


def train_tokenizer(args: argparse.Namespace) -> Path:
    tcfg = TokenizerTrainConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, crop=args.crop,
                                seed=args.seed, tiny=args.tiny, eval_every=args.eval_every,
                                save_every=args.eval_every, gan_start=args.gan_start, lr=args.lr,
                                disc_warmup=args.disc_warmup, gan_ramp=args.gan_ramp,
                                min_scale=args.min_scale, select=args.select)
    device = pick_device(args.device)
    seed_everything(tcfg.seed)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(run_dir / "log.jsonl")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    mcfg = tiny_tokenizer_config() if tcfg.tiny else TokenizerConfig()
    model = VQTokenizer(mcfg).to(device)
    disc = PatchDiscriminator(width=16 if tcfg.tiny else 64).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=tcfg.disc_lr, betas=(0.5, 0.9))
    budget = Budget(tcfg.steps, tcfg.minutes)
    step, best_score, gan_start_step = 0, -1e9, None
    data_rng_state = None

    resume = run_dir / "last.pt"
    if resume.exists():
        ck = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        step, best_score, gan_start_step = ck["step"], ck["best_score"], ck.get("gan_start_step")
        budget.elapsed_before = ck.get("elapsed", 0.0)
        set_rng_state(ck["rng"])
        data_rng_state = ck.get("data_rng")
        print(f"resumed from {resume} at step {step}")
    elif args.init:
        model = load_model(args.init, "tokenizer", device).train()
        opt_g = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(0.5, 0.9))
        if args.init_disc and Path(args.init_disc).exists():
            disc.load_state_dict(load_checkpoint(args.init_disc, "discriminator", device)["state_dict"])
            gan_start_step = -tcfg.disc_warmup - tcfg.gan_ramp  # GAN already trained: no warm-up again
        print(f"initialised weights from {args.init}")
        if gan_start_step is None and args.init_gan_on:
            gan_start_step = 0

    if args.freeze_encoder:
        # Decoder-only fine-tuning: tokens, codebook and model id stay exactly as shipped, so the edge bundle
        # and the predictor trained on these tokens remain valid.
        for module in (model.encoder, model.quantizer):
            for param in module.parameters():
                param.requires_grad_(False)
        if not resume.exists():
            opt_g = torch.optim.Adam(model.decoder.parameters(), lr=tcfg.lr, betas=(0.5, 0.9))
        tcfg.restart_until = 0.0

    shared = Path(args.shared_data) if args.shared_data else default_shared_data_dir()
    sources = args.data or default_train_sources(shared)
    images = [img for spec in sources for img in parse_source(spec)]
    sampler = CropSampler(images, tcfg.crop, device, min_scale=tcfg.min_scale)
    val = build_val_set(shared, device, tcfg.crop, args.val)
    rng = random.Random(tcfg.seed)
    if data_rng_state is not None:
        rng.setstate(data_rng_state)
    amp = tcfg.amp and device.type == "cuda"
    print(f"tokenizer: {sum(p.numel() for p in model.encoder.parameters())/1e6:.2f}M encoder params, "
          f"{sum(p.numel() for p in model.decoder.parameters())/1e6:.2f}M decoder params, "
          f"{len(images)} training images, device {device}")

    if step == 0 and args.init:  # the starting weights are a candidate too: GAN must beat them to be kept
        metrics = evaluate(model, val, tcfg.select)
        best_score = metrics["score"]
        save_model(run_dir / "best.pt", "tokenizer", model, {"step": 0, "val": metrics, "train": asdict(tcfg),
                                                             "gan_active": False, "init": str(args.init)}, half=False)
        log.write(step=0, eval=metrics, best=True)
        tqdm.write(f"[eval start] psnr {metrics['psnr']:.2f} hf {metrics['hf_ratio']:.2f} score {metrics['score']:.2f}")
    budget.start()
    bar = tqdm(total=tcfg.steps or None, initial=step, desc="tokenizer", dynamic_ncols=True)
    model.train()
    last_log = time.time()
    while not budget.done(step):
        progress = budget.progress(step)
        if gan_start_step is None and progress >= tcfg.gan_start:
            gan_start_step = step
        x = sampler.sample(tcfg.batch, rng)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        rec = out.reconstruction.float()
        l1 = (rec - x).abs().mean()
        ssim_l = ms_ssim_loss(rec, x)
        rec_loss = l1 + tcfg.msssim_weight * ssim_l
        loss = rec_loss + out.vq_loss.float()

        gan_on = gan_start_step is not None and step >= gan_start_step + tcfg.disc_warmup
        adv_w = torch.tensor(0.0)
        if gan_on:
            ramp = min(1.0, (step - gan_start_step - tcfg.disc_warmup) / tcfg.gan_ramp)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                fake_logits, fake_feats = disc(rec)
                with torch.no_grad():
                    _, real_feats = disc(x)
            g_adv = -fake_logits.float().mean()
            fm = feature_matching_loss([f.float() for f in fake_feats], [f.float() for f in real_feats])
            adv_w = adaptive_gan_weight(rec_loss, g_adv, model.decoder.last_layer_weight) * tcfg.gan_weight * ramp
            loss = loss + adv_w * g_adv + tcfg.feature_weight * ramp * fm
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt_g.step()

        d_loss = torch.tensor(0.0)
        if gan_start_step is not None and step >= gan_start_step:
            real = x.detach().requires_grad_(step % tcfg.r1_every == 0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                real_logits, _ = disc(real)
                fake_logits, _ = disc(rec.detach())
            d_loss = hinge_d_loss(real_logits.float(), fake_logits.float())
            if step % tcfg.r1_every == 0:
                d_loss = d_loss + tcfg.r1_gamma * tcfg.r1_every * 0.5 * r1_penalty(real_logits.float(), real)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        if step % tcfg.restart_every == 0 and step > 0 and progress < tcfg.restart_until:
            restarted = model.quantizer.restart_dead_codes(out.z)
        else:
            restarted = 0
        step += 1
        bar.update(1)
        if time.time() - last_log > 10 or step % 100 == 0:
            last_log = time.time()
            log.write(step=step, elapsed=budget.elapsed(), l1=l1, msssim_loss=ssim_l, vq=out.vq_loss,
                      d_loss=d_loss, adv_weight=adv_w, restarted=restarted)
            bar.set_postfix(l1=f"{l1.item():.3f}", d=f"{d_loss.item():.2f}", w=f"{float(adv_w):.2f}")
        if step % tcfg.eval_every == 0 or budget.done(step):
            metrics = evaluate(model, val, tcfg.select)
            is_best = metrics["score"] > best_score
            if is_best:
                best_score = metrics["score"]
                save_model(run_dir / "best.pt", "tokenizer", model,
                           {"step": step, "val": metrics, "train": asdict(tcfg), "gan_active": bool(gan_on)},
                           half=False)
            log.write(step=step, eval=metrics, best=is_best)
            tqdm.write(f"[eval step {step}] psnr {metrics['psnr']:.2f} hf {metrics['hf_ratio']:.2f} "
                       f"score {metrics['score']:.2f} perplexity {metrics['codebook_perplexity']:.0f} "
                       f"used {metrics['codes_used']:.2f}{' *best*' if is_best else ''}")
            atomic_save({"model": model.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                         "opt_d": opt_d.state_dict(), "step": step, "best_score": best_score,
                         "gan_start_step": gan_start_step, "elapsed": budget.elapsed(), "rng": rng_state(),
                         "data_rng": rng.getstate()},
                        run_dir / "last.pt")
            save_checkpoint(run_dir / "disc.pt", "discriminator", disc.state_dict())
    bar.close()
    return run_dir / "best.pt"


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
    p.add_argument("--disc-warmup", type=int, default=300, help="steps the discriminator trains alone first")
    p.add_argument("--gan-ramp", type=int, default=1000, help="steps over which the adversarial weight ramps in")
    p.add_argument("--min-scale", type=float, default=0.2,
                   help="smallest random crop scale (0.2: a 256 crop may cover 1280 source pixels)")
    p.add_argument("--select", choices=["detail", "psnr"], default="detail",
                   help="checkpoint selection score on the held-out crops")
    p.add_argument("--tiny", action="store_true", help="tiny model (tests, smoke runs)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    train_tokenizer(p.parse_args(argv))


if __name__ == "__main__":
    main()
