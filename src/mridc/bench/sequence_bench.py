"""``mridc-bench sequence``: a fixed camera's frames, MRIDC intra-only against MRIDC with inter frames, AVIF
stills and real video codecs, at one frame per second and one per 5 s.

Frames are the held-out vtest frames (500-794 of a 10 fps static camera), taken every ``interval x 10``. For each
``--bpp`` budget:

- ``mridc-intra``: every frame coded alone (``EdgeEncoder``, scale auto), as the product does today;
- ``mridc-inter``: ``SequenceEncoder`` (``mridc.edge.sequence``): the first frame intra at full resolution,
  then inter frames against the previous frame (every frame acked as stored), at the same byte budget per
  frame; frames whose scene did not change cost less than the budget;
- ``avif``: AVIF stills, each at the bytes of that frame's MRIDC intra stream (best setting, any downscale);
- ``x264`` / ``x265`` (``mridc.lab.video``): low-delay P frames only, no B-frames, one GOP, one-pass rate
  control at the same frame interval, targeting the mean bytes per frame of MRIDC intra at that budget
  (the best of a few downscales).

Decodes are the first picture (realism 0, ``--realism``). Quality: PSNR, MS-SSIM and MNv2-LPIPS per frame,
averaged. The comparison the issue asks for: MRIDC inter against MRIDC intra at equal mean bytes per frame
(intra's curve interpolated, log bytes), and the bytes inter needs to reach intra's quality. Latency over the
NB-IoT profile (``mridc.lab.link.PROFILES``) is computed, not emulated: bytes over the uplink rate, plus the
profile's latency, plus the measured decode time. Output: ``sequence.json``, ``summary.md``, ``sequence.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mridc.lab.provenance import load_1min, machine

from .edge_bench import command_line

HELP = "fixed-camera sequences: MRIDC intra vs inter frames vs AVIF stills vs x264/x265 low-delay video"
SOURCE_FPS = 10  # vtest.avi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--intervals", default="1,5", help="seconds between frames, comma-separated")
    p.add_argument("--bpp", default="0.005,0.01,0.02,0.03", help="MRIDC budgets per frame, comma-separated")
    p.add_argument("--codecs", default="avif,x264,x265", help="baselines: avif, x264, x265, svtav1")
    p.add_argument("--max-frames", type=int, default=30, help="frames per interval at most")
    p.add_argument("--realism", type=float, default=0.0)
    p.add_argument("--refresh", type=int, default=0, help="mridc-inter: intra at least every N frames (0: never)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--video", default=None, help="another fixed-camera video instead of vtest's eval frames")


def _frames(args, interval: float):
    from mridc.lab.datasets import video_frames, vtest

    stride = max(1, round(interval * SOURCE_FPS))
    if args.video:
        items = video_frames(Path(args.video), stride=stride)
    else:
        items = vtest(stride=stride)
    return items[: args.max_frames]


def run(args: argparse.Namespace) -> int:
    import torch

    from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder
    from mridc.cloud.sequence import SequenceFrames
    from mridc.edge.encoder import EdgeEncoder
    from mridc.edge.sequence import SequenceConfig, SequenceEncoder
    from mridc.lab.codecs import BudgetTooSmall, make_codec
    from mridc.lab.link import PROFILES
    from mridc.lab.metrics import ms_ssim, psnr
    from mridc.lab.perceptual import PerceptualDistance
    from mridc.lab.video import VideoCodecError, best_sequence, video_availability

    from .refine_bench import write_outputs

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = load_1min()
    budgets = [float(b) for b in args.bpp.split(",") if b]
    intervals = [float(i) for i in args.intervals.split(",") if i]
    codecs = [c for c in args.codecs.split(",") if c]
    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx", scale="auto")
    decoder = MRIDCDecoder.from_models(args.models_dir, device="cpu", backend="auto")
    settings = DecodeSettings(realism=args.realism)
    mnv2 = PerceptualDistance(backend="mnv2")
    skipped = {c: video_availability(c) for c in codecs if c != "avif" and video_availability(c)}
    for codec, reason in skipped.items():
        print(f"sequence: {codec} left out: {reason}", file=sys.stderr)
    rows: list[dict] = []
    decode_seconds: list[float] = []

    def measure(variant, interval, bpp, frames, decoded, sizes, extra=None) -> None:
        scores = [(psnr(f, d), ms_ssim(f, d), mnv2(f, d)) for f, d in zip(frames, decoded, strict=True)]
        rows.append({"variant": variant, "interval_s": interval, "bpp": bpp, "frames": len(frames),
                     "mean_bytes": float(np.mean(sizes)), "bytes": [int(s) for s in sizes],
                     "psnr": float(np.mean([s[0] for s in scores])), "ms_ssim": float(np.mean([s[1] for s in scores])),
                     "mnv2_lpips": float(np.mean([s[2] for s in scores])),
                     "psnr_per_frame": [round(s[0], 3) for s in scores], **(extra or {})})
        r = rows[-1]
        print(f"sequence: {interval:g} s, {variant} {bpp if bpp is not None else ''}: {r['mean_bytes']:.0f} B/frame, "
              f"PSNR {r['psnr']:.2f}, MNv2-LPIPS {r['mnv2_lpips']:.4f}", file=sys.stderr, flush=True)

    def decode(frame):
        start = time.perf_counter()
        image = decoder.decode_frames([frame], settings)[0].image
        decode_seconds.append(time.perf_counter() - start)
        return image

    for interval in intervals:
        items = _frames(args, interval)
        frames = [item.image for item in items]
        for bpp in budgets:
            intra = [encoder.encode(f, bpp=bpp) for f in frames]
            measure("mridc-intra", interval, bpp, frames, [decode(r.token_frame) for r in intra],
                    [len(r.bitstream) for r in intra])
            coder = SequenceEncoder(encoder, SequenceConfig(refresh_period=args.refresh))
            cloud = SequenceFrames(decoder.prior, model_id=decoder.model_id)
            coded, decoded = [], []
            for number, f in enumerate(frames, 1):
                c = coder.encode(f, number, bpp)
                coder.acknowledge(number)
                decoded.append(decode(cloud.token_frame(c.bitstream, "bench", number)))
                coded.append(c)
            measure("mridc-inter", interval, bpp, frames, decoded, [len(c.bitstream) for c in coded],
                    {"kinds": [c.kind for c in coded], "changed": [c.changed for c in coded],
                     "refreshed": [c.refreshed for c in coded], "known": [round(c.known_fraction, 3) for c in coded]})
            # A camera runs for hours: its frames once the cloud holds the whole grid (after the start-up).
            steady = [i for i, c in enumerate(coded) if c.kind == "inter" and c.known_fraction >= 0.99]
            if steady:
                rows[-1]["steady"] = {"frames": len(steady),
                                      "mean_bytes": float(np.mean([len(coded[i].bitstream) for i in steady])),
                                      "psnr": float(np.mean([rows[-1]["psnr_per_frame"][i] for i in steady]))}
            target = float(np.mean([len(r.bitstream) for r in intra]))
            if "avif" in codecs:
                avif = make_codec("avif")
                got, sizes, kept = [], [], []
                for f, r in zip(frames, intra, strict=True):
                    try:
                        payload, image, _ = avif.encode(f, len(r.bitstream) * 8)
                    except BudgetTooSmall:
                        continue
                    got.append(image)
                    sizes.append(len(payload))
                    kept.append(f)
                if kept:
                    measure("avif", interval, bpp, kept, got, sizes, {"frames_fitting": len(kept)})
            for codec in codecs:
                if codec == "avif" or codec in skipped:
                    continue
                try:
                    result = best_sequence(frames, codec, target, interval)
                except VideoCodecError as exc:
                    print(f"sequence: {codec} at {target:.0f} B/frame failed: {exc}", file=sys.stderr)
                    continue
                measure(codec, interval, bpp, frames, result.decoded, result.bytes_per_frame,
                        {"target_bytes": target, "scale": result.scale, "settings": result.settings})
    summary = compare(rows)
    nbiot = PROFILES["nbiot"]
    decode_s = statistics.median(decode_seconds) if decode_seconds else 0.0
    latency = [{"variant": r["variant"], "interval_s": r["interval_s"], "bpp": r["bpp"],
                "mean_bytes": r["mean_bytes"],
                "capture_to_decoded_s": r["mean_bytes"] * 8 / nbiot.up_bps + nbiot.latency_ms / 1000
                + (decode_s if r["variant"].startswith("mridc") else 0.0)}
               for r in rows if r["variant"].startswith("mridc")]
    doc = {"meta": {"command": command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    "machine": machine(), "load_1min_start": load_start, "load_1min_end": load_1min()},
           "config": {"intervals_s": intervals, "bpp": budgets, "codecs": codecs, "skipped": skipped,
                      "realism": args.realism, "refresh": args.refresh, "max_frames": args.max_frames,
                      "video": args.video or "vtest frames 500-794", "decode_s_median": decode_s,
                      "nbiot": {"up_bps": nbiot.up_bps, "latency_ms": nbiot.latency_ms}},
           "summary": summary, "latency_nbiot": latency, "rows": rows}
    write_outputs(out, "sequence", doc, render_markdown, plot)
    return 0


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the curve (x in log bytes), None outside it."""
    pts = sorted(zip(xs, ys, strict=True))
    lx = [np.log(p[0]) for p in pts]
    if not pts or not lx[0] <= np.log(x) <= lx[-1]:
        return None
    return float(np.interp(np.log(x), lx, [p[1] for p in pts]))


def compare(rows: list[dict]) -> list[dict]:
    """Per interval and budget: inter against intra at equal mean bytes, and the bytes inter needs for intra's
    quality (each curve interpolated in log bytes; None where the other curve does not reach)."""
    out = []
    for interval in sorted({r["interval_s"] for r in rows}):
        intra = sorted((r for r in rows if r["variant"] == "mridc-intra" and r["interval_s"] == interval),
                       key=lambda r: r["mean_bytes"])
        inter = sorted((r for r in rows if r["variant"] == "mridc-inter" and r["interval_s"] == interval),
                       key=lambda r: r["mean_bytes"])
        if not intra or not inter:
            continue
        for r in inter:
            at_bytes = {m: _interp([i["mean_bytes"] for i in intra], [i[m] for i in intra], r["mean_bytes"])
                        for m in ("psnr", "mnv2_lpips")}
            out.append({"interval_s": interval, "bpp": r["bpp"], "kind": "inter at its bytes vs intra at the same",
                        "inter_bytes": r["mean_bytes"], "inter_psnr": r["psnr"], "inter_mnv2": r["mnv2_lpips"],
                        "intra_psnr_at_bytes": at_bytes["psnr"], "intra_mnv2_at_bytes": at_bytes["mnv2_lpips"],
                        "delta_psnr": None if at_bytes["psnr"] is None else r["psnr"] - at_bytes["psnr"],
                        "delta_mnv2": None if at_bytes["mnv2_lpips"] is None else r["mnv2_lpips"] - at_bytes[
                            "mnv2_lpips"]})
        # Bytes inter needs for intra's quality: invert inter's PSNR curve (it rises with bytes).
        for r in intra:
            pts = sorted((i["psnr"], i["mean_bytes"]) for i in inter)
            need = None
            if pts and pts[0][0] <= r["psnr"] <= pts[-1][0]:
                need = float(np.exp(np.interp(r["psnr"], [p[0] for p in pts], [np.log(p[1]) for p in pts])))
            elif pts and r["psnr"] < pts[0][0]:
                need = f"<= {pts[0][1]:.0f}"
            out.append({"interval_s": interval, "bpp": r["bpp"], "kind": "bytes inter needs for intra's PSNR",
                        "intra_bytes": r["mean_bytes"], "intra_psnr": r["psnr"], "inter_bytes_needed": need,
                        "ratio": need / r["mean_bytes"] if isinstance(need, float) else None})
    return out


def render_markdown(doc: dict) -> str:
    meta, cfg = doc["meta"], doc["config"]
    refresh = f"every {cfg['refresh']} frames" if cfg["refresh"] else "none"
    lines = [f"# Fixed-camera sequences ({meta['date']})", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"1-minute load: {meta['load_1min_start']} at start, {meta['load_1min_end']} at end  ",
             (f"Frames: {cfg['video']}, at most {cfg['max_frames']} per interval; first picture (realism "
              f"{cfg['realism']}). mridc-inter: first frame intra at full resolution, then inter frames, every frame "
              f"acked as stored, intra refresh: {refresh}. "
              "AVIF: each frame at its "
              "MRIDC intra stream's bytes. Video codecs: low-delay P only, one GOP, one-pass, targeting MRIDC "
              f"intra's mean bytes. Left out: {cfg['skipped'] or 'none'}."), "",
             "| interval | variant | bpp | mean bytes/frame | PSNR | MS-SSIM | MNv2-LPIPS |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(doc["rows"], key=lambda r: (r["interval_s"], r["variant"], r["mean_bytes"])):
        lines.append(f"| {r['interval_s']:g} s | {r['variant']} | {r['bpp']:g} | {r['mean_bytes']:.0f} | "
                     f"{r['psnr']:.2f} | {r['ms_ssim']:.4f} | {r['mnv2_lpips']:.4f} |")
    lines += ["", "## MRIDC inter against MRIDC intra", "",
              ("| interval | bpp | inter bytes | inter PSNR | intra PSNR at those bytes | dPSNR | inter MNv2 | "
               "intra MNv2 at those bytes |"), "|---|---|---|---|---|---|---|---|"]

    def f(v, spec):
        return "-" if v is None else (v if isinstance(v, str) else format(v, spec))

    for s in doc["summary"]:
        if s["kind"].startswith("inter at"):
            lines.append(f"| {s['interval_s']:g} s | {s['bpp']:g} | {s['inter_bytes']:.0f} | {s['inter_psnr']:.2f} | "
                         f"{f(s['intra_psnr_at_bytes'], '.2f')} | {f(s['delta_psnr'], '+.2f')} | "
                         f"{s['inter_mnv2']:.4f} | {f(s['intra_mnv2_at_bytes'], '.4f')} |")
    steady = [r for r in doc["rows"] if r.get("steady")]
    if steady:
        lines += ["", ("mridc-inter once the cloud holds the whole grid (the frames after the start-up, as a camera "
                       "that runs for hours sends them):"), "", "| interval | bpp | frames | mean bytes/frame | PSNR |",
                  "|---|---|---|---|---|"]
        for r in steady:
            lines.append(f"| {r['interval_s']:g} s | {r['bpp']:g} | {r['steady']['frames']} | "
                         f"{r['steady']['mean_bytes']:.0f} | {r['steady']['psnr']:.2f} |")
    lines += ["", "| interval | intra bpp | intra bytes | intra PSNR | inter bytes for that PSNR | ratio |",
              "|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        if s["kind"].startswith("bytes"):
            lines.append(f"| {s['interval_s']:g} s | {s['bpp']:g} | {s['intra_bytes']:.0f} | {s['intra_psnr']:.2f} | "
                         f"{f(s['inter_bytes_needed'], '.0f')} | {f(s['ratio'], '.2f')} |")
    lines += ["", (f"Capture to decoded over NB-IoT ({cfg['nbiot']['up_bps'] / 1000:g} kbit/s up, "
                   f"{cfg['nbiot']['latency_ms']:g} ms latency; computed from the bytes, plus the median decode "
                   f"{cfg['decode_s_median']:.2f} s):"), "", "| interval | variant | bpp | s |", "|---|---|---|---|"]
    for lat in doc["latency_nbiot"]:
        lines.append(f"| {lat['interval_s']:g} s | {lat['variant']} | {lat['bpp']:g} | "
                     f"{lat['capture_to_decoded_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = sorted({r["interval_s"] for r in doc["rows"]})
    fig, axes = plt.subplots(2, len(intervals), figsize=(6 * len(intervals), 8), dpi=110, squeeze=False)
    for col, interval in enumerate(intervals):
        for variant in sorted({r["variant"] for r in doc["rows"]}):
            pts = sorted((r for r in doc["rows"] if r["variant"] == variant and r["interval_s"] == interval),
                         key=lambda r: r["mean_bytes"])
            if not pts:
                continue
            for row, metric in enumerate(("psnr", "mnv2_lpips")):
                axes[row][col].plot([p["mean_bytes"] for p in pts], [p[metric] for p in pts], marker="o",
                                    label=variant)
        for row, metric in enumerate(("PSNR, dB", "MNv2-LPIPS (lower is better)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_xlabel("mean bytes per frame")
            ax.set_title(f"one frame every {interval:g} s: {metric}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sequence.png")
    plt.close(fig)
