"""A predictor's top-1 on masked tokens of the eval images (photos/eval and vtest eval frames), beside the
nearest-kept-token copy, at a random keep of 0.5: the measure of `mridc-bench models`, for a tokenizer and
predictor that are not shipped (e.g. a candidate set).

    python tools/predictor_eval.py TOKENIZER.pt PREDICTOR.pt

Tokens come from the tokenizer in torch (fp32), images fit to 768 px, one fixed random mask per image (seed 0).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mridc.cloud.pipeline import nearest_kept_fill
from mridc.cloud.predictor import WindowedPredictor
from mridc.cloud.zoo import load_model
from mridc.lab.datasets import resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokenizer")
    p.add_argument("predictor")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_model(args.tokenizer, "tokenizer", "cpu")
    predictor = WindowedPredictor(load_model(args.predictor, "predictor", "cpu"))
    images = resolve(["photos-eval", "vtest"], max_side=768, vtest_stride=30)
    rng = np.random.default_rng(0)
    stride = tokenizer.cfg.stride
    hits = copies = total = 0
    for item in images:
        x = torch.from_numpy(np.ascontiguousarray(item.image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        h, w = x.shape[-2:]
        x = x[..., : h // stride * stride, : w // stride * stride]
        tokens = tokenizer.encode_indices(x)[0].numpy().astype(np.int64)
        keep = rng.random(tokens.shape) < 0.5
        with torch.no_grad():
            logits = predictor(torch.from_numpy(tokens)[None], torch.from_numpy(keep)[None])[0]
        masked = ~keep
        hits += int((logits.argmax(-1).numpy()[masked] == tokens[masked]).sum())
        copies += int((nearest_kept_fill(tokens, keep)[masked] == tokens[masked]).sum())
        total += int(masked.sum())
    print(f"{len(images)} images, {total} masked tokens: predictor top-1 {hits / total:.4f}, "
          f"nearest kept token {copies / total:.4f}")


if __name__ == "__main__":
    main()
