"""Train the conditional diffusion model (BPCG part 2): it learns the residual between a training crop and the
frozen tokenizer's decode of its tokens, where some tokens were replaced the way a predictor gets them wrong,
with a trust map telling which tokens were real."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mridc.cloud.data import CropSampler, default_train_sources, parse_source
from mridc.cloud.diffusion.pipeline import diffusion_condition
from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.diffusion.unet import ConditionalUNet, UNetConfig, tiny_unet_config
from mridc.cloud.train.common import (
    Budget,
    JsonlLog,
    add_common_arguments,
    data_streams,
    init_from_shipped,
    pick_device,
    resume_state,
    rng_state,
    seed_everything,
    trainer_main,
)
from mridc.cloud.train.masks import sample_keep_masks
from mridc.cloud.zoo import atomic_save, load_model, save_checkpoint
from mridc.shared.zoo import default_shared_data_dir


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


def train_diffusion(args: argparse.Namespace) -> Path:
    device = pick_device(args.device)
    seed_everything(args.seed)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(run_dir / "log.jsonl")
    tokenizer = load_model(args.tokenizer, "tokenizer", device)
    stride = tokenizer.cfg.stride
    cfg = tiny_unet_config() if args.tiny else UNetConfig()
    model = ConditionalUNet(cfg).to(device)
    model = init_from_shipped("diffusion", args.init, device) or model
    scheduler = DDIMScheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    budget = Budget(args.steps, args.minutes)
    ck = resume_state(run_dir, device, model, opt, budget)
    step = ck["step"] if ck else 0
    if ck:
        ema = ck["ema"]
    shared = Path(args.shared_data) if args.shared_data else default_shared_data_dir()
    images = [img for spec in (args.data or default_train_sources(shared)) for img in parse_source(spec)]
    sampler = CropSampler(images, args.crop, device)
    rng, gen = data_streams(args.seed, ck)
    amp = device.type == "cuda"
    budget.start()
    bar = tqdm(total=args.steps or None, initial=step, desc="diffusion", dynamic_ncols=True)
    last_log = time.time()
    while not budget.done(step):
        with torch.no_grad():
            x = sampler.sample(args.batch, rng)
            tokens = tokenizer.encode_indices(x)
            keep = sample_keep_masks(x, stride, gen, min_keep=0.05)
            decoded = tokenizer.decode_indices(corrupt_masked_tokens(tokens, keep, gen)).clamp(-1, 1)
            cond = diffusion_condition(decoded, keep.float())
            residual = (x - decoded) / cfg.residual_scale
            t = torch.randint(1, scheduler.num_train_timesteps, (x.shape[0],), generator=gen).to(device)
            noise = torch.randn(residual.shape, generator=gen).to(device)
            noisy = scheduler.add_noise(residual, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(noisy, t, cond)
        loss = F.mse_loss(pred.float(), residual)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(args.ema).add_(v, alpha=1 - args.ema)
                else:
                    ema[k].copy_(v)
        step += 1
        bar.update(1)
        if time.time() - last_log > 10 or step % 100 == 0:
            last_log = time.time()
            log.write(step=step, elapsed=budget.elapsed(), loss=loss)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or budget.done(step):
            save_checkpoint(run_dir / "best.pt", "diffusion", ema, config=model.cfg.to_dict(),  # the EMA weights ship
                            meta={"step": step, "ema": args.ema, "tokenizer": str(args.tokenizer)})
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
                         "elapsed": budget.elapsed(), "rng": rng_state(),
                         "data_rng": (rng.getstate(), gen.get_state())}, run_dir / "last.pt")
    bar.close()
    return run_dir / "best.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, kind="diffusion", batch=8, crop=128, lr=0.0002, frozen_tokenizer=True)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--save-every", type=int, default=500)


def main(argv=None) -> int:
    return trainer_main(__doc__, add_arguments, train_diffusion, argv)


if __name__ == "__main__":
    raise SystemExit(main())
