"""Train the bidirectional token predictor (BPCG part 1) on tokens of training crops from a frozen tokenizer."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mridc.cloud.data import CropSampler, default_train_sources, default_val_sources, parse_source
from mridc.cloud.predictor import BidirectionalTokenPredictor, PredictorConfig, masked_token_loss, tiny_predictor_config
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
from mridc.cloud.zoo import atomic_save, load_model, save_model
from mridc.shared.zoo import default_shared_data_dir


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, masks: torch.Tensor) -> dict:
    model.eval()
    logits = model(tokens, masks).float()
    model.train()
    masked = ~masks
    target = tokens[masked]
    pred = logits[masked]
    top1 = (pred.argmax(-1) == target).float().mean()
    top5 = (pred.topk(5, dim=-1).indices == target[:, None]).any(-1).float().mean()
    return {"top1": float(top1), "top5": float(top5), "loss": float(torch.nn.functional.cross_entropy(pred, target))}


def train_predictor(args: argparse.Namespace) -> Path:
    device = pick_device(args.device)
    seed_everything(args.seed)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(run_dir / "log.jsonl")
    tokenizer = load_model(args.tokenizer, "tokenizer", device)
    stride = tokenizer.cfg.stride
    cfg = (tiny_predictor_config(tokenizer.cfg.codebook_size) if args.tiny
           else PredictorConfig(codebook_size=tokenizer.cfg.codebook_size))
    model = BidirectionalTokenPredictor(cfg).to(device)
    model = init_from_shipped("predictor", args.init, device) or model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.96), weight_decay=0.01)
    budget = Budget(args.steps, args.minutes)
    ck = resume_state(run_dir, device, model, opt, budget)
    step, best = (ck["step"], ck["best"]) if ck else (0, -1.0)

    shared = Path(args.shared_data) if args.shared_data else default_shared_data_dir()
    images = [img for spec in (args.data or default_train_sources(shared)) for img in parse_source(spec)]
    sampler = CropSampler(images, args.crop, device)
    rng, gen = data_streams(args.seed, ck)
    val_imgs = CropSampler([i for s in default_val_sources(shared) for i in parse_source(s)] + images[:3], args.crop,
                           device, min_scale=0.5).sample(16, random.Random(7))
    val_tokens = tokenizer.encode_indices(val_imgs)
    val_masks = sample_keep_masks(val_imgs, stride, torch.Generator().manual_seed(7), min_keep=0.3, max_keep=0.75)
    amp = device.type == "cuda"
    budget.start()
    bar = tqdm(total=args.steps or None, initial=step, desc="predictor", dynamic_ncols=True)
    last_log = time.time()
    while not budget.done(step):
        lr = args.lr * min(1.0, (step + 1) / 500)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            x = sampler.sample(args.batch, rng)
            tokens = tokenizer.encode_indices(x)
            masks = sample_keep_masks(x, stride, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(tokens, masks)
        loss = masked_token_loss(logits, tokens, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if time.time() - last_log > 10 or step % 100 == 0:
            last_log = time.time()
            log.write(step=step, elapsed=budget.elapsed(), loss=loss, lr=lr)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or budget.done(step):
            metrics = evaluate(model, val_tokens, val_masks)
            is_best = metrics["top1"] > best
            if is_best:
                best = metrics["top1"]
                save_model(run_dir / "best.pt", "predictor", model,
                           {"step": step, "val": metrics, "tokenizer": str(args.tokenizer)}, half=False)
            log.write(step=step, eval=metrics, best=is_best)
            tqdm.write(f"[eval step {step}] top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f}")
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                         "elapsed": budget.elapsed(), "rng": rng_state(),
                         "data_rng": (rng.getstate(), gen.get_state())}, run_dir / "last.pt")
    bar.close()
    return run_dir / "best.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, kind="predictor", batch=16, crop=256, lr=0.0004, frozen_tokenizer=True)
    p.add_argument("--eval-every", type=int, default=500)


def main(argv=None) -> int:
    return trainer_main(__doc__, add_arguments, train_predictor, argv)


if __name__ == "__main__":
    raise SystemExit(main())
