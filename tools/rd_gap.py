"""Join two `mridc-bench rd` runs: means per codec and budget, one MRIDC codec at a high budget against itself
at a low one per image, its budget use, and its wins against the better classical codec on each metric.

  .venv/bin/python tools/rd_gap.py                       # docs/results/rd_std + rd_finer, mridc-sauto:1.5-r0
  .venv/bin/python tools/rd_gap.py --runs A/rd.json B/rd.json --codec mridc-sauto-r0 --low 0.03 --high 0.05
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = {"psnr": True, "ms_ssim": True, "perceptual": False, "lpips_alex": False, "dists": False}  # higher better?
CLASSICAL = ("avif-obu", "webp")


def better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric] else a < b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["docs/results/rd_std/rd.json", "docs/results/rd_finer/rd.json"])
    p.add_argument("--codec", default="mridc-sauto:1.5-r0")
    p.add_argument("--low", type=float, default=0.03)
    p.add_argument("--high", type=float, default=0.05)
    args = p.parse_args(argv)
    records = [r for run in args.runs for r in json.loads(Path(run).read_text())["records"]]

    means: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (image, bpp) -> codec -> record
    for r in records:
        cells[(r["image"], r["target_bpp"])][r["codec"]] = r
        for m in ("bpp", *METRICS):
            if r.get(m) is not None:
                means[(r["codec"], r["target_bpp"])][m].append(r[m])
    for (codec, bpp), values in sorted(means.items()):
        row = {m: round(sum(v) / len(v), 4) for m, v in values.items()}
        print(f"{codec:22s} {bpp:.3f} ({len(values['bpp'])} images): {row}")

    images = sorted({img for img, _ in cells})
    pairs = [(cells[(i, args.high)].get(args.codec), cells[(i, args.low)].get(args.codec)) for i in images]
    pairs = [(hi, lo) for hi, lo in pairs if hi and lo]
    if pairs:
        wins = {m: sum(better(m, hi[m], lo[m]) for hi, lo in pairs) for m in METRICS}
        spend = [hi["bpp"] / args.high for hi, _ in pairs]
        print(f"{args.codec} at {args.high} better than at {args.low}, images of {len(pairs)}: {wins}; "
              f"share of the {args.high} budget spent: mean {sum(spend) / len(spend):.3f}, min {min(spend):.3f}")
    for bpp in (args.low, args.high):
        wins, n = defaultdict(int), 0
        for (_, b), by_codec in cells.items():
            mine = by_codec.get(args.codec)
            rivals = [by_codec[c] for c in CLASSICAL if c in by_codec]
            if b != bpp or not mine or not rivals:
                continue
            n += 1
            for m in ("perceptual", "lpips_alex", "dists"):
                best = min(r[m] for r in rivals)
                wins[m] += mine[m] < best
        print(f"{args.codec} at {bpp}: wins against the better of {'/'.join(CLASSICAL)} on {n} images: {dict(wins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
