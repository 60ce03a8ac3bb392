"""One training session for all three cloud models, resumable across sessions and machines.

1. tokenizer (from `--init-dir`'s tokenizer.pt if present, else from scratch), best checkpoint kept;
2. predictor and diffusion model trained at the same time (two processes) on the frozen tokenizer;
3. shipping files written to `--ship-dir`: tokenizer.pt, tokenizer_disc.pt, predictor.pt, diffusion.pt (fp16).

`make train` runs it on the CPU; on a lent GPU the same command takes `--device cuda` and bigger batches.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


def ship_best(run_best: Path, kind: str, dest: Path, extra_meta: dict) -> None:
    from mridc.cloud.zoo import load_model, save_model

    model = load_model(run_best, kind)
    save_model(dest, kind, model, {**model.meta, **extra_meta})
    print(f"shipped {kind} -> {dest} ({dest.stat().st_size / 1e6:.1f} MB)", flush=True)


def ship_discriminator(run_disc: Path, dest: Path) -> None:
    """The GAN's discriminator, so a later session continues adversarial training (`--init-disc`)."""
    from mridc.cloud.zoo import load_checkpoint, save_checkpoint

    save_checkpoint(dest, "discriminator", load_checkpoint(run_disc, "discriminator")["state_dict"], half=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="folder for run checkpoints (resume state)")
    p.add_argument("--ship-dir", default="models", help="where the shipping weights are written")
    p.add_argument("--init-dir", default="models", help="continue from the weights shipped here, if present")
    p.add_argument("--shared-data", help="reference data folder (default ../shared/data or $MRIDC_DATA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer-minutes", type=float, default=90.0)
    p.add_argument("--bpcg-minutes", type=float, default=60.0, help="predictor and diffusion, in parallel")
    p.add_argument("--tokenizer-batch", type=int, default=8)
    p.add_argument("--predictor-batch", type=int, default=16)
    p.add_argument("--diffusion-batch", type=int, default=8)
    p.add_argument("--predictor-crop", type=int, default=256)
    p.add_argument("--diffusion-crop", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--hardware", default="", help="recorded in the model metadata (e.g. 'NVIDIA H200')")
    p.add_argument("--skip-tokenizer", action="store_true", help="train only predictor and diffusion")
    p.add_argument("--tokenizer-init", help="start the tokenizer from this file instead of --init-dir's "
                   "tokenizer.pt (e.g. models/candidates/tokenizer_ema.pt; its GAN phase starts from scratch)")
    p.add_argument("--tokenizer-args", default="", help="extra arguments for the tokenizer trainer, one string "
                   "(e.g. \"--gan-start 0.5 --select psnr\")")
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    args = p.parse_args(argv)

    runs, ship, init = Path(args.runs), Path(args.ship_dir), Path(args.init_dir)
    ship.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    common = ["--device", args.device] + (["--shared-data", args.shared_data] if args.shared_data else [])
    common += ["--tiny"] if args.tiny else []
    hw = {"hardware": args.hardware or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"),
          "session_date": time.strftime("%Y-%m-%d")}

    tok_ship = ship / "tokenizer.pt"
    if not args.skip_tokenizer:
        cmd = py + ["mridc.cloud.train.tokenizer", "--out", str(runs / "tokenizer"), "--steps", "0",
                    "--minutes", str(args.tokenizer_minutes), "--batch", str(args.tokenizer_batch),
                    "--eval-every", str(args.eval_every)] + common
        if not (runs / "tokenizer" / "last.pt").exists():
            if args.tokenizer_init:
                if not Path(args.tokenizer_init).exists():
                    print(f"--tokenizer-init: {args.tokenizer_init} does not exist", file=sys.stderr)
                    return 2
                cmd += ["--init", args.tokenizer_init]
            elif (init / "tokenizer.pt").exists():
                cmd += ["--init", str(init / "tokenizer.pt"), "--init-disc", str(init / "tokenizer_disc.pt")]
        cmd += shlex.split(args.tokenizer_args)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        ship_best(runs / "tokenizer" / "best.pt", "tokenizer", tok_ship, hw)
        ship_discriminator(runs / "tokenizer" / "disc.pt", ship / "tokenizer_disc.pt")

    procs = []
    for kind, batch, crop in (("predictor", args.predictor_batch, args.predictor_crop),
                              ("diffusion", args.diffusion_batch, args.diffusion_crop)):
        cmd = py + [f"mridc.cloud.train.{kind}", "--tokenizer", str(tok_ship), "--out", str(runs / kind),
                    "--steps", "0", "--minutes", str(args.bpcg_minutes), "--batch", str(batch), "--crop", str(crop)]
        cmd += common
        if (init / f"{kind}.pt").exists() and not (runs / kind / "last.pt").exists():
            # A new tokenizer changes the token meanings; predictor weights still help as a start.
            cmd += ["--init", str(init / f"{kind}.pt")]
        print("$", " ".join(cmd), flush=True)
        procs.append((kind, subprocess.Popen(cmd)))
    failed = []
    for kind, proc in procs:
        if proc.wait() != 0:
            failed.append(kind)
            continue
        ship_best(runs / kind / "best.pt", kind, ship / f"{kind}.pt", hw)
    if failed:
        print(f"training failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
