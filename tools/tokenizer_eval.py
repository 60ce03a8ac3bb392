"""PSNR / LPIPS-Alex / MNv2-LPIPS of tokenizer checkpoints at all tokens (torch fp32, no masking, no diffusion).

For comparing training candidates before they are exported: the edge bundle and the predictor belong to one
tokenizer, so `mridc-bench models` can only score the shipped set. Images are fitted to 768 px and padded to
the stride by edge replication, as the encoder does.
  .venv/bin/python tools/tokenizer_eval.py models/tokenizer.pt runs/tok/best.pt [--images DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from mridc.cloud.zoo import load_model
from mridc.lab.datasets import resolve
from mridc.lab.lpips import StandardPerceptual
from mridc.lab.metrics import psnr
from mridc.lab.perceptual import PerceptualDistance


def reconstruct(tokenizer, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = tokenizer.cfg.stride
    padded = np.pad(image, ((0, -h % s), (0, -w % s), (0, 0)), mode="edge")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        out = tokenizer(x).reconstruction.clamp(-1, 1)
    return ((out[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)[:h, :w]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="tokenizer files (shipped or a run's best.pt)")
    p.add_argument("--images", nargs="*", default=["photos-eval"], help="eval set names or folders")
    p.add_argument("--max-side", type=int, default=768)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    images = resolve(args.images, max_side=args.max_side)
    perceptual = StandardPerceptual.load("cpu", metrics=("lpips_alex",))
    mnv2 = PerceptualDistance(backend="mnv2")
    for path in args.checkpoints:
        tokenizer = load_model(path, "tokenizer", "cpu").eval()
        scores = [(psnr(img, rec), perceptual.lpips_alex(img, rec), mnv2(img, rec))
                  for img in (item.image for item in images) for rec in [reconstruct(tokenizer, img)]]
        p_mean, l_mean, m_mean = (float(np.mean(v)) for v in zip(*scores, strict=True))
        print(json.dumps({"checkpoint": str(path), "images": len(scores), "psnr": round(p_mean, 3),
                          "lpips_alex": round(l_mean, 4), "mnv2_lpips": round(m_mean, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
