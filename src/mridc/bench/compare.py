"""`mridc-bench compare`: MRIDC against the classical codecs on the same images, from two `rd` runs.

The classical searches are slow, so they are run once (docs/results/baselines) and MRIDC runs are compared
against them image by image: only images measured by both runs count, and a codec that missed the budget on an
image is counted as missing there (the table says how many images each mean covers).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HELP = "compare MRIDC rd results with classical baselines on the same images (markdown + JSON)"
METRICS = (("psnr", "PSNR dB", True), ("ms_ssim", "MS-SSIM", True), ("perceptual", "MNv2-LPIPS", False),
           ("lpips_alex", "LPIPS-Alex", False), ("lpips_vgg", "LPIPS-VGG", False), ("dists", "DISTS", False),
           ("niqe", "NIQE", False))
NETWORK_NOTE = ("LPIPS-VGG uses the VGG16 backbone of a VGG LPIPS training loss, and DISTS uses the same VGG16 "
                "features, so a model trained with such a loss is partly optimised for both; LPIPS-Alex (AlexNet) "
                "and MNv2-LPIPS (MobileNetV2) share no network with it.")
# Shown only where some record has them (rd runs before these metrics existed do not).
OPTIONAL_METRICS = ("lpips_alex", "lpips_vgg", "dists")


def present_metrics(result: dict) -> tuple:
    """METRICS, less the optional ones that no codec at any rate has a value for."""
    seen = {k for row in result["table"].values() for vals in row.values() for k in vals}
    return tuple(m for m in METRICS if m[0] not in OPTIONAL_METRICS or m[0] in seen)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mridc", nargs="+", default=["docs/results/rd/rd.json"],
                   help="rd.json files with MRIDC codecs; a later file's (image, codec, rate) records "
                        "replace earlier ones")
    p.add_argument("--baselines", default="docs/results/baselines/rd.json", help="rd.json with classical codecs")
    p.add_argument("--bpp", default="0.02,0.03")
    p.add_argument("--out", default="docs/results/rd", help="writes compare.md, compare.json, compare.png here")
    p.add_argument("--plot-bpp", default="0.01,0.015,0.02,0.03,0.05", help="rates on the plot ('' for no plot)")


def _records(path: str) -> list[dict]:
    return [r for r in json.loads(Path(path).read_text())["records"] if r.get("status", "ok") == "ok"]


def _merged(paths) -> list[dict]:
    merged: dict = {}
    for path in [paths] if isinstance(paths, str) else paths:
        for r in _records(path):
            merged[(r["image"], r["codec"], r["target_bpp"])] = r
    return list(merged.values())


def compare(mridc_paths, baseline_path: str, bpps: list[float]) -> dict:
    ours, theirs = _merged(mridc_paths), _records(baseline_path)
    images = sorted({r["image"] for r in ours} & {r["image"] for r in theirs})
    table: dict = {}
    for bpp in bpps:
        rows = defaultdict(lambda: defaultdict(list))
        for r in ours + theirs:
            if r["image"] in images and abs(r["target_bpp"] - bpp) < 1e-9:
                for key, _, _ in METRICS:
                    if r.get(key) is not None and np.isfinite(r[key]):
                        rows[r["codec"]][key].append(r[key])
                rows[r["codec"]]["bpp"].append(r["bpp"])
        table[str(bpp)] = {codec: {k: (float(np.mean(v)), len(v)) for k, v in vals.items()}
                           for codec, vals in sorted(rows.items())}
    sources = [mridc_paths] if isinstance(mridc_paths, str) else list(mridc_paths)
    return {"images": images, "table": table, "sources": {"mridc": sources, "baselines": baseline_path}}


def to_markdown(result: dict) -> str:
    lines = [(f"Images measured by both runs: {len(result['images'])}. MRIDC from "
             f"{', '.join(result.get('sources', {}).get('mridc', []))}; baselines from "
             f"{result.get('sources', {}).get('baselines', '')}."), ""]
    metrics = present_metrics(result)
    for bpp, codecs in result["table"].items():
        lines += [f"### {bpp} bpp", "", "| codec | " + " | ".join(h for _, h, _ in metrics) + " | mean bpp |",
                  "|---|" + "---|" * (len(metrics) + 1)]
        classical = [c for c in codecs if not c.startswith("mridc")]
        best = {}
        for key, _, higher in metrics:
            vals = [(codecs[c][key][0], c) for c in classical if key in codecs[c]]
            if vals:
                best[key] = (max if higher else min)(vals)
        for codec, vals in codecs.items():
            cells = []
            for key, _, _ in metrics:
                if key not in vals:
                    cells.append("-")
                    continue
                mean, n = vals[key]
                mark = " **best classical**" if best.get(key, (None, None))[1] == codec else ""
                cells.append(f"{mean:.3f}{'' if n == len(result['images']) else f' ({n})'}{mark}")
            lines.append(f"| {codec} | " + " | ".join(cells) + f" | {vals['bpp'][0]:.4f} |")
        lines.append("")
    lower = ["MNv2-LPIPS (uncalibrated, non-standard)", *(h for k, h, _ in metrics if k in OPTIONAL_METRICS)]
    lines.append(f"Higher is better for PSNR and MS-SSIM; lower for {', '.join(lower)} and NIQE.")
    if any(k in OPTIONAL_METRICS for k, _, _ in metrics):
        lines += ["", NETWORK_NOTE]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """bpp vs each metric, one line per codec (MRIDC variants dashed), over the common images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = present_metrics(result)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    codecs = sorted({c for row in result["table"].values() for c in row})
    for ax, (key, label, higher) in zip(axes, metrics):
        for codec in codecs:
            pts = sorted((float(bpp), row[codec][key][0]) for bpp, row in result["table"].items()
                         if codec in row and key in row[codec])
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "--o" if codec.startswith("mridc") else "-s", ms=3, lw=1.2, label=codec)
        ax.set_xlabel("bits per pixel")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MRIDC vs classical codecs at equal bits ({len(result['images'])} images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    result = compare(args.mridc, args.baselines, [float(b) for b in args.bpp.split(",") if b])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_bpp:
        plot(compare(args.mridc, args.baselines, [float(b) for b in args.plot_bpp.split(",") if b]),
             out / "compare.png")
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (out / "compare.md").write_text(md)
    print(md)
    return 0
