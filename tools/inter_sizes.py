"""Inter-frame sizes on synthetic token grids, per token coder (the figures in docs/bitstream.md, "Inter frames").

A 48x32 grid (768x512 at stride 16), tokens drawn from a Zipf prior over 1024 codes with neighbour repeats, the
reference fully known. Cases: the same frame again, an 8x8 and a 10x16 object moved one token right, and 25 %
of the positions changed to unrelated tokens.

Run: .venv/bin/python tools/inter_sizes.py
"""

from __future__ import annotations

import numpy as np

from mridc.shared.bitstream import TokenFrame, compress
from mridc.shared.entropy import TokenPrior
from mridc.shared.inter import ReferenceGrid, compress_inter

H, W, K = 32, 48, 1024


def scene(rng: np.random.Generator, prior_p: np.ndarray) -> np.ndarray:
    grid = rng.choice(K, size=(H, W), p=prior_p)
    repeat = rng.random((H, W)) < 0.3
    for y in range(H):
        for x in range(1, W):
            if repeat[y, x]:
                grid[y, x] = grid[y, x - 1]
    return grid


def changes(new: np.ndarray, mask: np.ndarray) -> TokenFrame:
    return TokenFrame(width=W * 16, height=H * 16, grid_h=H, grid_w=W, model_id=1, codebook_bits=10,
                      keep_mask=mask, kept_tokens=new[mask].astype(np.uint16))


def main() -> None:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, K + 1)
    p /= p.sum()
    prior = TokenPrior.from_counts(np.maximum(1, (p * 1e6).astype(np.int64)))
    ref_tokens = scene(rng, p)
    intra = compress(changes(ref_tokens, np.ones((H, W), bool)), prior)
    print(f"intra frame of the scene: {len(intra)} bytes")
    cases = {"same frame": ref_tokens.copy()}
    for h, w in ((8, 8), (10, 16)):
        moved = ref_tokens.copy()
        obj = scene(rng, p)[:h, :w]
        moved[8:8 + h, 10:10 + w] = ref_tokens[8:8 + h, 10:10 + w]  # background where the object was
        moved[8:8 + h, 11:11 + w] = obj  # the object, one token right of where the reference had it
        previous = ref_tokens.copy()
        previous[8:8 + h, 10:10 + w] = obj
        cases[f"{h}x{w} object moved one token right"] = (moved, previous)
    random_change = ref_tokens.copy()
    flip = rng.random((H, W)) < 0.25
    random_change[flip] = rng.choice(K, size=int(flip.sum()), p=p)
    cases["25 % random changes"] = random_change
    for name, case in cases.items():
        new, ref = (case if isinstance(case, tuple) else (case, ref_tokens))
        grid = ReferenceGrid(ref, np.ones((H, W), bool))
        mask = new != ref
        sizes = {coder: len(compress_inter(changes(new, mask), grid, 7, prior, token_coder=coder))
                 for coder in ("static", "adaptive", "ref", "auto")}
        print(f"{name}: {int(mask.sum())} changed; bytes " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
