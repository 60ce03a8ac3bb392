"""``mridc-bench refine``: what the cloud's decodes cost per frame and what they look like, old against new.

Every decode configuration runs on the same streams (the shipped edge encoder at ``--bpp``) of the same
frames, cover-cropped to 768x512, one after another in one process with ``--threads`` torch/ORT threads:

- ``preview-torch``: the first picture, realism 0, PyTorch (the service's old default decode);
- ``refined-torch``: realism 0.5 with 8 DDIM steps at realism 1 (4 steps), PyTorch (the old refined decode);
- ``preview-ort`` and ``refined-ort``: the same through ONNX Runtime (``mridc.cloud.accel``);
- ``refined-fast``: realism 0.5 with ``--fast-steps`` (default 2, so one DDIM step), ONNX Runtime (the new
  refined decode, the service's and the CLI's default);
- ``refine-step``: the same picture from a kept preview (the refiner alone): what the service spends on a
  frame's refined picture after its own preview.

Cost per frame = ``decode_frames`` (what the service calls) + the PNG encode the service does, the median
of ``--repeats`` timed runs after one warm-up. Quality: PSNR, MS-SSIM, MNv2-LPIPS, LPIPS-Alex, DISTS and
NIQE against the original frame. JSON, a markdown summary and a plot go to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mridc.lab.provenance import load_1min, machine, write_json_atomic

from .edge_bench import command_line, cover_crop, parse_size

HELP = "cost per frame and quality of the cloud decodes (preview/refined, PyTorch/ONNX Runtime), old vs new"

CONFIGS = {  # name -> (backend, realism, steps at realism 1 or None for --fast-steps)
    "preview-torch": ("torch", 0.0, 8),
    "refined-torch": ("torch", 0.5, 8),
    "preview-ort": ("onnxruntime", 0.0, 8),
    "refined-ort": ("onnxruntime", 0.5, 8),
    "refined-fast": ("onnxruntime", 0.5, None),
    # The service's marginal cost of the refined picture: its own preview kept (keep_intermediate), then the
    # refiner alone (`refine_outputs`); the same pixels as refined-fast.
    "refine-step": ("onnxruntime", 0.5, None),
}
METRICS = ("psnr", "ms_ssim", "mnv2_lpips", "lpips_alex", "dists", "niqe")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (refine.json, summary.md, refine.png)")
    p.add_argument("--images", nargs="*", default=["photos-eval", "kodak", "vtest"],
                   help="eval sets, folders or files (default photos-eval, kodak, vtest)")
    p.add_argument("--limit", type=int, default=12, help="frames in all (spread evenly over the sets)")
    p.add_argument("--size", default="768x512", help="frame size WxH")
    p.add_argument("--bpp", type=float, default=0.02, help="edge rate of the streams")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--fast-steps", type=int, default=2, help="refined-fast: DDIM steps at realism 1")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per frame and configuration (median)")
    p.add_argument("--timed-frames", type=int, default=4, help="frames that are timed (all are scored)")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (the service's 2)")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--seed", type=int, default=0)


def spread(items: list, limit: int) -> list:
    if limit <= 0 or len(items) <= limit:
        return items
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def niqe_or_none(niqe, image: np.ndarray) -> float | None:
    try:
        return niqe(image)
    except ValueError:  # a frame too small for NIQE's 96x96 blocks
        return None


def run(args: argparse.Namespace) -> int:
    import torch

    from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder
    from mridc.cloud.service.worker import encode_png
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab.datasets import resolve
    from mridc.lab.lpips import StandardPerceptual
    from mridc.lab.metrics import ms_ssim, psnr
    from mridc.lab.niqe import niqe
    from mridc.lab.perceptual import PerceptualDistance

    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        print(f"mridc-bench refine: unknown configs {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_start = load_1min()
    width, height = parse_size(args.size)
    frames = [(item.name, cover_crop(item.image, width, height))
              for item in spread(resolve(args.images, max_side=0), args.limit)]
    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx", threads=1)
    streams = [bytes(encoder.encode(image, bpp=args.bpp).bitstream) for _, image in frames]
    decoders = {backend: MRIDCDecoder.from_models(args.models_dir, device="cpu", backend=backend)
                for backend in {CONFIGS[n][0] for n in names}}
    mnv2 = PerceptualDistance(backend="mnv2")
    standard = StandardPerceptual.load("cpu")
    rows = []
    for name in names:
        backend, realism, steps = CONFIGS[name]
        decoder = decoders[backend]
        settings = DecodeSettings(realism=realism, steps=steps or args.fast_steps, seed=args.seed)
        for i, ((frame_name, image), stream) in enumerate(zip(frames, streams, strict=True)):
            token_frame = decoder.validate(stream)
            preview = None
            if name == "refine-step":
                preview = decoder.decode_frames([token_frame], DecodeSettings(realism=0.0, seed=args.seed),
                                                keep_intermediate=True)[0]
            times = []
            for r in range((args.repeats + 1) if i < args.timed_frames else 1):
                t0 = time.perf_counter()
                if preview is not None:
                    decoded = decoder.refine_outputs([preview], settings)[0].image
                else:
                    decoded = decoder.decode_frames([token_frame], settings)[0].image
                encode_png(decoded)
                if r > 0 or i >= args.timed_frames:
                    times.append(time.perf_counter() - t0)
            row = {"config": name, "frame": frame_name, "bytes": len(stream),
                   "bpp": len(stream) * 8 / (width * height), "psnr": psnr(image, decoded),
                   "ms_ssim": ms_ssim(image, decoded), "mnv2_lpips": mnv2(image, decoded),
                   "lpips_alex": standard.lpips_alex(image, decoded), "dists": standard.dists(image, decoded),
                   "niqe": niqe_or_none(niqe, decoded), "timed": i < args.timed_frames,
                   "seconds": statistics.median(times), "load_1min": load_1min()}
            rows.append(row)
            print(f"refine: {name} {frame_name}: {row['seconds']:.3f} s, PSNR {row['psnr']:.2f}, "
                  f"MNv2-LPIPS {row['mnv2_lpips']:.3f}", file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        summary[name] = {"seconds_median": statistics.median(r["seconds"] for r in mine if r["timed"]),
                         **{m: float(np.mean([r[m] for r in mine if r[m] is not None]))
                            if any(r[m] is not None for r in mine) else None for m in METRICS}}
    doc = {"meta": {"command": command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    "machine": machine(), "load_1min_start": load_start, "load_1min_end": load_1min()},
           "config": {"frames": [n for n, _ in frames], "size": [width, height], "bpp": args.bpp,
                      "threads": args.threads, "repeats": args.repeats, "timed_frames": args.timed_frames,
                      "fast_steps": args.fast_steps,
                      "configs": {n: dict(zip(("backend", "realism", "steps"), CONFIGS[n])) for n in names}},
           "summary": summary, "rows": rows}
    write_outputs(out, "refine", doc, render_markdown, plot)
    return 0


def write_outputs(out: Path, stem: str, doc: dict, render, plot_fn) -> None:
    """STEM.json (written atomically), summary.md and STEM.png (the plot function's), and say so."""
    write_json_atomic(out / f"{stem}.json", doc)
    (out / "summary.md").write_text(render(doc))
    plot_fn(doc, out)
    print(f"wrote {out / f'{stem}.json'}, {out / 'summary.md'}, {out / f'{stem}.png'}", file=sys.stderr)


def render_markdown(doc: dict) -> str:
    meta, cfg, summary = doc["meta"], doc["config"], doc["summary"]
    lines = [f"# Cloud decode cost and quality ({meta['date']})", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"1-minute load average: {meta['load_1min_start']} at start, {meta['load_1min_end']} at end  ",
             (f"{len(cfg['frames'])} frames cover-cropped to {cfg['size'][0]}x{cfg['size'][1]}, streams at "
              f"{cfg['bpp']:g} bpp; {cfg['threads']} threads. Seconds: decode_frames + PNG encode per frame "
              f"(what the service spends), median over the first {cfg['timed_frames']} frames x "
              f"{cfg['repeats']} repeats. Quality: mean over all frames."), "",
             ("| config | backend | realism | DDIM steps | s / frame | PSNR | MS-SSIM | MNv2-LPIPS | LPIPS-Alex | "
              "DISTS | NIQE |"), "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    for name, s in summary.items():
        c = cfg["configs"][name]
        steps = c["steps"] or cfg["fast_steps"]
        ddim = int(np.ceil(c["realism"] * steps)) if c["realism"] > 0 else 0
        lines.append(f"| {name} | {c['backend']} | {c['realism']:g} | {ddim} | {s['seconds_median']:.3f} | "
                     f"{fmt(s['psnr'], '.2f')} | {fmt(s['ms_ssim'], '.4f')} | {fmt(s['mnv2_lpips'], '.4f')} | "
                     f"{fmt(s['lpips_alex'], '.4f')} | {fmt(s['dists'], '.4f')} | {fmt(s['niqe'], '.2f')} |")
    if "refine-step" in summary and "preview-ort" in summary and "preview-torch" in summary:
        step, prev_new, prev_old = summary["refine-step"], summary["preview-ort"], summary["preview-torch"]
        both = step["seconds_median"] + prev_new["seconds_median"]
        lines += ["", (f"The service's cost of both pictures of a frame (preview-ort + refine-step): {both:.3f} s, "
                       f"{both / prev_old['seconds_median']:.2f}x the old default decode (preview-torch, "
                       f"{prev_old['seconds_median']:.3f} s), which gave the preview only.")]
    if "refined-torch" in summary and "refined-fast" in summary and "preview-torch" in summary:
        old, new, prev = summary["refined-torch"], summary["refined-fast"], summary["preview-torch"]
        lines += ["", (f"New refined decode (refined-fast) against the old one (refined-torch): "
                       f"{new['seconds_median']:.3f} s against {old['seconds_median']:.3f} s a frame "
                       f"({new['seconds_median'] / old['seconds_median']:.2f}x), and "
                       f"{new['seconds_median'] / prev['seconds_median']:.2f}x the old preview's "
                       f"{prev['seconds_median']:.3f} s. Quality change (new - old): "
                       + ", ".join(f"{m} {fmt(None if new[m] is None or old[m] is None else new[m] - old[m], '+.4f')}"
                                   for m in METRICS) + ". Lower is better for the LPIPS, DISTS and NIQE.")]
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=110)
    axes[0].bar(names, [summary[n]["seconds_median"] for n in names], color="tab:blue")
    axes[0].set_title("seconds per 768x512 frame (decode + PNG)", fontsize=9)
    axes[1].bar(names, [summary[n]["psnr"] for n in names], color="tab:green")
    axes[1].set_title("PSNR dB (higher is better)", fontsize=9)
    axes[1].set_ylim(min(summary[n]["psnr"] for n in names) - 1, max(summary[n]["psnr"] for n in names) + 0.5)
    axes[2].bar(names, [summary[n]["mnv2_lpips"] for n in names], color="tab:red")
    axes[2].set_title("MNv2-LPIPS (lower is better)", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"cloud decodes on {len(doc['config']['frames'])} frames at {doc['config']['bpp']:g} bpp, "
                 f"{doc['config']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "refine.png")
    plt.close(fig)
