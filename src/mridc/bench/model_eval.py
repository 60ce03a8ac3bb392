"""`mridc-bench models`: the numbers on the model card, measured on the public eval set.

Tokenizer at full tokens (every token kept, realism 0): PSNR, MS-SSIM, the standard perceptual distances
LPIPS-Alex, LPIPS-VGG and DISTS (None, with the reason, where their weights are absent), coded bpp, codebook
usage and perplexity; predictor top-1 / top-5 on randomly masked tokens (keep ratio 0.5) against the nearest-kept and
most-frequent-token baselines.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

HELP = "model-card metrics of the shipped models on the eval set"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="*", default=["photos-eval", "vtest"], help="eval sets/folders/files")
    p.add_argument("--vtest-stride", type=int, default=30)
    p.add_argument("--max-side", type=int, default=768)
    p.add_argument("--models", help="models folder")
    p.add_argument("--out", default="docs/results/models", help="output folder")
    p.add_argument("--lpips-weights", default=None, help="LPIPS/DISTS weights folder (default: shared data)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder, nearest_kept_fill
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab.datasets import resolve
    from mridc.lab.lpips import LABELS as STANDARD_LABELS
    from mridc.lab.lpips import METRICS as STANDARD
    from mridc.lab.lpips import StandardPerceptual
    from mridc.lab.metrics import ms_ssim, psnr

    torch.set_num_threads(2)
    images = resolve(args.images, max_side=args.max_side, vtest_stride=args.vtest_stride)
    encoder = EdgeEncoder.from_bundle(args.models, backend="torch")
    decoder = MRIDCDecoder.from_models(args.models)
    standard = StandardPerceptual.load("cpu", getattr(args, "lpips_weights", None))
    K = decoder.codebook_size
    counts = np.zeros(K, np.int64)
    rows = []
    top1 = top5 = nn_hits = mode_hits = total = 0
    rng = np.random.default_rng(0)
    for item in images:
        img = item.image
        result = encoder.encode(img, keep_ratio=1.0)
        frame = decoder.validate(result.bitstream)
        out = decoder.decode_frames([frame], DecodeSettings(realism=0.0))[0].image
        counts += np.bincount(result.tokens.ravel(), minlength=K)
        rows.append({"name": item.name, "set": item.set, "width": img.shape[1], "height": img.shape[0],
                     "bpp_full_tokens": len(result.bitstream) * 8 / (img.shape[0] * img.shape[1]),
                     "psnr": psnr(img, out), "ms_ssim": ms_ssim(img, out), **standard.measure(img, out)})
        tokens = result.tokens.astype(np.int64)
        keep = rng.random(tokens.shape) < 0.5
        with torch.no_grad():
            logits = decoder.predictor(torch.from_numpy(tokens)[None], torch.from_numpy(keep)[None])[0]
        masked = ~keep
        target = torch.from_numpy(tokens[masked])
        pred = logits[torch.from_numpy(masked)]
        top1 += int((pred.argmax(-1) == target).sum())
        top5 += int((pred.topk(5, -1).indices == target[:, None]).any(-1).sum())
        nn_hits += int((nearest_kept_fill(tokens, keep)[masked] == tokens[masked]).sum())
        mode_hits += int((tokens[masked] == decoder.mode_token).sum())
        total += int(masked.sum())
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    summary = {
        "images": len(rows),
        "by_set": {},
        "codebook": {"size": K, "used_share": float((counts > 0).mean()),
                     "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))},
        "predictor_keep0.5_random": {"top1": top1 / max(total, 1), "top5": top5 / max(total, 1),
                                     "nearest_kept_top1": nn_hits / max(total, 1),
                                     "most_frequent_top1": mode_hits / max(total, 1), "masked_tokens": total},
        "perceptual": {m: (f"unavailable ({standard.missing[m]})" if m in standard.missing else STANDARD_LABELS[m])
                       for m in STANDARD},
        "network_note": "LPIPS-VGG and DISTS both use VGG16 features, the backbone of a VGG LPIPS training loss; "
                        "LPIPS-Alex shares no network with it.",
        "model_id": f"{decoder.model_id:08x}",
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
        "command": "mridc-bench models " + " ".join(f"--images {i}" for i in args.images),
    }
    for set_name in sorted({r["set"] for r in rows}):
        sel = [r for r in rows if r["set"] == set_name]
        summary["by_set"][set_name] = {k: float(np.mean([r[k] for r in sel]))
                                       for k in ("psnr", "ms_ssim", "bpp_full_tokens")}
        for k in STANDARD:
            values = [r[k] for r in sel if r.get(k) is not None]
            summary["by_set"][set_name][k] = float(np.mean(values)) if values else None
        summary["by_set"][set_name]["images"] = len(sel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_eval.json").write_text(json.dumps({"summary": summary, "per_image": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
