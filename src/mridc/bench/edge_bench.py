"""``mridc-bench edge``: what the camera pays to encode a 768x512 frame, per backend, on 1 thread.

Each backend (ONNX Runtime int8, ONNX Runtime fp32, LiteRT int8 when ``encoder_int8.tflite`` exists, torch
fp32) runs in a fresh subprocess, so its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` after the timed
runs) is that backend's alone. Per backend: median latency of the encoder (frame -> token grid: scaling,
the network, the nearest-codeword search) and of the whole encode at ``--bpp`` (encoder + key regions +
MLM priority map + mask selection + entropy coding), over every timing frame and repeat.

The ONNX int8 worker then times, interleaved in the same process (so under the same machine load), the
MRIDC encode and Pillow's JPEG, WebP and AVIF encoders on the same frames: at full size with each
encoder's default settings (AVIF: speed 6, 1 thread), and at the setting ``lab/codecs.py`` picks for the
same bit budget (downscale + quality; the Lanczos downscale is counted). Ratios are MRIDC / codec.

Token agreement: every backend's token grid against torch fp32 on the evaluation set. Tokenizer quality:
all tokens kept (``keep_ratio=1``), decoded at realism 0, against JPEG/WebP/AVIF at the same bytes (each
searching quality and downscale). The machine is shared: the 1-minute load average is recorded next to
every timing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mridc.lab.provenance import (
    json_default,
    load_1min,
    machine,
    peak_rss_mib,
    ru_maxrss_mib,
    write_json_atomic,
)

HELP = "edge encoder latency, peak RSS and model size per backend (1 thread) vs JPEG/WebP/AVIF; tokenizer quality"
FRAME_SIZE = (768, 512)  # width, height
TARGET_MS = 40.0
BACKEND_ORDER = ("onnx", "onnx-fp32", "litert", "torch")
BACKEND_LABELS = {"onnx": "ONNX Runtime int8", "onnx-fp32": "ONNX Runtime fp32", "litert": "LiteRT int8",
                  "torch": "torch fp32"}
MODEL_FILES = {"onnx": "edge/encoder_int8.onnx", "onnx-fp32": "edge/encoder_fp32.onnx",
               "litert": "edge/encoder_int8.tflite", "torch": "tokenizer.pt"}
QUALITY_CODECS = "jpeg,webp,avif,avif-obu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", nargs="+", default=["photos-eval"],
                   help="where the timing frames come from (cover-resized and centre-cropped to 768x512)")
    p.add_argument("--frames", type=int, default=3, help="timing frames (first N images)")
    p.add_argument("--size", default="768x512", help="timing frame size WxH (the benchmark is defined at 768x512)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per frame and backend")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bpp", type=float, default=0.02, help="rate of the whole-encode timing")
    p.add_argument("--backends", default=",".join(BACKEND_ORDER))
    p.add_argument("--eval-images", nargs="+", default=["photos-eval", "vtest"],
                   help="token agreement and tokenizer quality set (set names, folders, files)")
    p.add_argument("--vtest-stride", type=int, default=60)
    p.add_argument("--eval-limit", type=int, default=None, help="first N evaluation images only")
    p.add_argument("--quality-codecs", default=QUALITY_CODECS, help="'' skips the tokenizer quality part")
    p.add_argument("--no-classical-timing", action="store_true", help="skip the JPEG/WebP/AVIF encode timing")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="encoder threads (the target is 1)")
    p.add_argument("--decode-threads", type=int, default=1, help="torch threads of the quality decode")
    p.add_argument("--perceptual-weights", default=None)
    p.add_argument("--worker-timeout", type=float, default=900.0)


# ---- frames ---------------------------------------------------------------------------------------------
def cover_crop(image: np.ndarray, width: int = FRAME_SIZE[0], height: int = FRAME_SIZE[1]) -> np.ndarray:
    """Resize (Lanczos) so the image covers width x height, then cut the centre: a camera-sized frame."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size != (w, h):
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    y0, x0 = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[y0:y0 + height, x0:x0 + width])


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def timing_frames(specs, count: int, size: tuple[int, int] = FRAME_SIZE) -> tuple[list[str], list[np.ndarray]]:
    from mridc.lab.datasets import resolve

    items = resolve(specs, max_side=0, limit=count)
    return [i.name for i in items], [cover_crop(i.image, *size) for i in items]


def median_ms(values) -> float | None:
    values = list(values)
    return round(statistics.median(values) * 1000, 3) if values else None


# ---- classical encoders at fixed settings (what the camera would run instead) ----------------------------
def classical_encoders(bpp: float, frame: np.ndarray) -> dict[str, dict]:
    """name -> {"fn": frame -> bytes, "settings": ...}: Pillow defaults at full size, and the low-rate setting
    that ``lab/codecs.py`` picks for ``bpp`` on this frame (downscale counted)."""
    from PIL import Image

    from mridc.lab import codecs as classical

    defaults = {
        "jpeg": ("JPEG", {"quality": 75}),
        "webp": ("WEBP", {"quality": 80, "method": 4}),
        "avif": ("AVIF", {"quality": 75, "speed": 6, "max_threads": 1}),
    }
    out: dict[str, dict] = {}
    for name, (fmt, kw) in defaults.items():
        if classical.availability(name):
            continue

        def full(img, fmt=fmt, kw=kw):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt, **kw)
            return buf.getvalue()

        out[f"{name}"] = {"fn": full, "settings": {"size": list(frame.shape[1::-1]), **kw}, "kind": "default"}
        codec = classical.make_codec(name)
        budget = int(bpp * frame.shape[0] * frame.shape[1])
        try:
            _payload, _dec, info = codec.encode(frame, budget)
        except classical.BudgetTooSmall:
            continue
        factor, quality = info["downscale"], info["quality"]
        sw, sh = info["coded_size"]

        def low(img, codec=codec, factor=factor, quality=quality, sw=sw, sh=sh):
            small = img if factor == 1.0 else classical.downscale(img, sw, sh)
            return codec.encode_file(small, quality)

        out[f"{name}@{bpp:g}bpp"] = {"fn": low, "kind": "low-rate", "settings": {
            "size": [sw, sh], "downscale": factor, "quality": quality, "bytes": info["bytes"],
            **{k: v for k, v in codec.save_kwargs(quality).items() if k != "quality"}}}
    return out


# ---- the worker (one fresh process per backend) ----------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    data = np.load(args.frames_npz)
    frames = [data[k] for k in sorted(data.files, key=lambda k: int(k[1:]))]
    rec: dict = {"backend": args.worker, "load_1min_start": load_1min()}
    t0 = time.perf_counter()
    from mridc.edge.encoder import EdgeEncoder

    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend=args.worker, threads=args.threads)
    rec["load_s"] = round(time.perf_counter() - t0, 3)
    rec["rss_after_load_mib"] = round(peak_rss_mib(), 1)
    for _ in range(args.warmup):
        encoder.encode(frames[0], bpp=args.bpp)
    stages: dict[str, list[float]] = {}
    sizes = []
    for _ in range(args.repeats):
        for frame in frames:
            cpu = time.process_time()
            result = encoder.encode(frame, bpp=args.bpp)
            # CPU seconds of the process: with 1 thread this is the wall time an idle core would take, and it
            # moves much less than wall time when other jobs share the cores.
            stages.setdefault("total_cpu", []).append(time.process_time() - cpu)
            for key, value in result.timings.items():
                stages.setdefault(key, []).append(value)
            sizes.append(len(result.bitstream))
    rec["load_1min_end"] = load_1min()
    rec["runs"] = len(stages.get("total", []))
    rec["median_ms"] = {k: median_ms(v) for k, v in stages.items()}
    rec["p90_ms"] = {k: round(float(np.percentile(v, 90)) * 1000, 3) for k, v in stages.items()}
    rec["bytes_median"] = int(statistics.median(sizes))
    rec["peak_rss_mib"] = round(peak_rss_mib(), 1)  # after the timed runs, before anything else runs in this process
    rec["ru_maxrss_mib"] = round(ru_maxrss_mib(), 1)  # includes the launching process's peak (see peak_rss_mib)

    if args.tokens_out:
        evald = np.load(args.eval_npz)
        tokens = {k: encoder.tokens(evald[k]) for k in evald.files}
        np.savez(args.tokens_out, **tokens)

    if args.classical:
        rec["interleaved"] = interleaved_timing(encoder, frames, args)
    return rec


def interleaved_timing(encoder, frames: list[np.ndarray], args) -> dict:
    """MRIDC encode and each classical encoder, round-robin per frame and repeat (same load for all)."""
    per_frame = [classical_encoders(args.bpp, f) for f in frames]
    names = sorted({n for enc in per_frame for n in enc})
    times: dict[str, list[float]] = {"mridc": [], **{n: [] for n in names}}
    cpu: dict[str, list[float]] = {"mridc": [], **{n: [] for n in names}}
    sizes: dict[str, list[int]] = {n: [] for n in names}
    loads = [load_1min()]
    for enc in per_frame:  # warm-up: first calls load codec libraries
        for n in enc:
            enc[n]["fn"](frames[0])
    for _ in range(args.repeats):
        for frame, enc in zip(frames, per_frame, strict=True):
            t, c = time.perf_counter(), time.process_time()
            encoder.encode(frame, bpp=args.bpp)
            times["mridc"].append(time.perf_counter() - t)
            cpu["mridc"].append(time.process_time() - c)
            for n in names:
                if n in enc:
                    t, c = time.perf_counter(), time.process_time()
                    data = enc[n]["fn"](frame)
                    times[n].append(time.perf_counter() - t)
                    cpu[n].append(time.process_time() - c)
                    sizes[n].append(len(data))
        loads.append(load_1min())
    out = {"median_ms": {n: median_ms(v) for n, v in times.items()},
           "median_cpu_ms": {n: median_ms(v) for n, v in cpu.items() if v},
           "bytes_median": {n: int(statistics.median(v)) for n, v in sizes.items() if v},
           "settings": {n: per_frame[0][n]["settings"] for n in names if n in per_frame[0]},
           "kind": {n: per_frame[0][n]["kind"] for n in names if n in per_frame[0]},
           "load_1min": {"start": loads[0], "end": loads[-1], "max": max(loads)}}
    m = out["median_ms"]["mridc"]
    out["ratio_mridc_over"] = {n: round(m / v, 3) for n, v in out["median_ms"].items() if n != "mridc" and v}
    mc = out["median_cpu_ms"]["mridc"]
    out["cpu_ratio_mridc_over"] = {n: round(mc / v, 3) for n, v in out["median_cpu_ms"].items()
                                   if n != "mridc" and v}
    return out


def run_worker(backend: str, args, work: Path, classical: bool, tokens: bool) -> dict:
    cmd = [sys.executable, "-m", "mridc.bench.edge_bench", "--worker", backend,
           "--frames-npz", str(work / "frames.npz"), "--eval-npz", str(work / "eval.npz"),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--bpp", str(args.bpp),
           "--threads", str(args.threads)]
    if args.models_dir:
        cmd += ["--models-dir", str(args.models_dir)]
    if tokens:
        cmd += ["--tokens-out", str(work / f"tokens_{backend}.npz")]
    if classical:
        cmd += ["--classical"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    before = load_1min()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"backend": backend, "status": "error", "error": " | ".join(tail), "load_1min_before": before}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec.update(status="ok", load_1min_before=before, load_1min_after=load_1min())
    return rec


def baseline_rss_mib() -> float | None:
    """Peak RSS of a process that imports the edge package and does nothing: the floor under every backend."""
    code = ("import mridc.edge.encoder, mridc.bench.edge_bench, mridc.lab.provenance as p; "
            "print(round(p.peak_rss_mib(), 1))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    return float(proc.stdout.strip()) if proc.returncode == 0 else None


# ---- token agreement and tokenizer quality ---------------------------------------------------------------
def token_agreement(work: Path, backends: list[str], names: list[str]) -> dict:
    ref_path = work / "tokens_torch.npz"
    if not ref_path.exists():
        return {"reference": "torch", "skipped": "the torch backend did not run"}
    ref = np.load(ref_path)
    out: dict = {"reference": "torch fp32", "backends": {}}
    for backend in backends:
        path = work / f"tokens_{backend}.npz"
        if backend == "torch" or not path.exists():
            continue
        got = np.load(path)
        per = {names[int(k[1:])]: float(np.mean(got[k] == ref[k])) for k in ref.files}
        total = sum(int(np.sum(got[k] == ref[k])) for k in ref.files)
        count = sum(int(ref[k].size) for k in ref.files)
        out["backends"][backend] = {"agreement": round(total / count, 5), "tokens": count,
                                    "min_image": round(min(per.values()), 5), "per_image": per}
    return out


def tokenizer_quality(eval_items, args) -> dict:
    """Every token kept, decoded at realism 0, vs classical codecs at the same bytes per image."""
    import torch

    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab import codecs as classical
    from mridc.lab.metrics import ms_ssim, psnr
    from mridc.lab.perceptual import PerceptualDistance

    torch.set_num_threads(max(1, args.decode_threads))
    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx", threads=args.threads)
    decoder = MRIDCDecoder.from_models(models_dir=args.models_dir, device="cpu")
    perceptual = PerceptualDistance(weights=args.perceptual_weights)
    names = [c for c in args.quality_codecs.split(",") if c]
    codec_list, skipped = [], {}
    for name in names:
        reason = classical.availability(name)
        if reason:
            skipped[name] = reason
        else:
            codec_list.append(classical.make_codec(name))
    records = []
    for item in eval_items:
        ref = item.image
        result = encoder.encode(ref, keep_ratio=1.0)
        payload = bytes(result.bitstream)
        t = time.perf_counter()
        decoded = np.asarray(decoder.decode(payload, realism=0.0), dtype=np.uint8)
        decode_s = time.perf_counter() - t
        pixels = ref.shape[0] * ref.shape[1]
        base = {"image": item.name, "set": item.set, "size": [ref.shape[1], ref.shape[0]]}
        records.append({**base, "codec": "mridc-full", "bytes": len(payload), "bpp": len(payload) * 8 / pixels,
                        "psnr": psnr(ref, decoded), "ms_ssim": ms_ssim(ref, decoded),
                        "perceptual": perceptual(ref, decoded), "decode_s": round(decode_s, 3)})
        for codec in codec_list:
            try:
                cpayload, cdec, info = codec.encode(ref, len(payload) * 8)
            except classical.BudgetTooSmall:
                records.append({**base, "codec": codec.name, "status": "no_fit"})
                continue
            finally:
                codec.clear_cache()
            records.append({**base, "codec": codec.name, "bytes": len(cpayload), "bpp": info["bpp"],
                            "downscale": info["downscale"], "quality": info["quality"],
                            "psnr": psnr(ref, cdec), "ms_ssim": ms_ssim(ref, cdec),
                            "perceptual": perceptual(ref, cdec)})
        print(f"  quality: {item.name} {len(payload)} B ({records[-1 - len(codec_list)]['bpp']:.4f} bpp)",
              file=sys.stderr, flush=True)
    summary = []
    n = len(eval_items)
    for codec in ["mridc-full"] + [c.name for c in codec_list]:
        ok = [r for r in records if r["codec"] == codec and "psnr" in r]
        if not ok:
            summary.append({"codec": codec, "n": n, "n_fit": 0})
            continue
        summary.append({"codec": codec, "n": n, "n_fit": len(ok),
                        **{k: round(float(np.mean([r[k] for r in ok])), 5)
                           for k in ("bpp", "psnr", "ms_ssim", "perceptual")}})
    return {"perceptual": perceptual.name, "decoder_realism": 0.0, "keep_ratio": 1.0,
            "note": "classical codecs get each image's MRIDC byte count as budget and search quality x downscale "
                    "(best PSNR); means over the images where they fit",
            "skipped": skipped, "summary": summary, "records": records}


# ---- report ------------------------------------------------------------------------------------------------
def plot(doc: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [b for b in doc["backends"] if b.get("status") == "ok"]
    inter = next((b.get("interleaved") for b in rows if b.get("interleaved")), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    labels = [BACKEND_LABELS.get(b["backend"], b["backend"]) for b in rows]
    enc = [b["median_ms"]["encoder"] for b in rows]
    tot = [b["median_ms"]["total"] for b in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, enc, 0.4, label="encoder (frame -> tokens)")
    ax.bar(x + 0.2, tot, 0.4, label=f"whole encode @ {doc['config']['bpp']:g} bpp")
    xt = list(labels)
    if inter:
        extra = [n for n in inter["median_ms"] if n != "mridc"]
        xs = np.arange(len(rows), len(rows) + len(extra))
        ax.bar(xs, [inter["median_ms"][n] for n in extra], 0.5, color="grey", label="Pillow encoders (same run)")
        xt += extra
        x = np.concatenate([x, xs])
    ax.axhline(TARGET_MS, color="red", linestyle=":", linewidth=1, label=f"target {TARGET_MS:g} ms")
    ax.set_xticks(x, xt, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median latency, ms (1 thread)")
    ax.set_yscale("log")
    ax.set_title(f"{'x'.join(map(str, doc['config']['frame_size']))} encode, {doc['config']['threads']} thread "
                 f"(load {doc['meta']['load_1min_start']:.1f} on "
                 f"{doc['meta']['cpus']} cores)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    ax.bar(np.arange(len(rows)), [b["peak_rss_mib"] for b in rows], 0.6)
    if doc.get("baseline_rss_mib"):
        ax.axhline(doc["baseline_rss_mib"], color="grey", linestyle=":", label="python + mridc.edge import")
        ax.legend(fontsize=7)
    for i, b in enumerate(rows):
        size = doc["model_files"].get(b["backend"], {}).get("bytes")
        if size:
            ax.annotate(f"model {size / 1e6:.2f} MB", (i, b["peak_rss_mib"]), ha="center", fontsize=7,
                        textcoords="offset points", xytext=(0, 3))
    ax.set_xticks(np.arange(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peak RSS, MiB (fresh process)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "edge_latency.png")
    plt.close(fig)
    paths.append("edge_latency.png")

    quality = doc.get("tokenizer_quality") or {}
    summ = [s for s in quality.get("summary", []) if s.get("n_fit")]
    if summ:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=110)
        for ax, metric, label in zip(axes, ("psnr", "ms_ssim", "perceptual"),
                                     ("PSNR dB (higher better)", "MS-SSIM (higher better)",
                                      f"{quality['perceptual']} (lower better)"), strict=True):
            ax.bar(range(len(summ)), [s[metric] for s in summ], 0.6,
                   color=["tab:red" if s["codec"] == "mridc-full" else "tab:blue" for s in summ])
            ax.set_xticks(range(len(summ)), [f"{s['codec']}\n{s['n_fit']}/{s['n']}" for s in summ], fontsize=7)
            ax.set_title(label, fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        bpp = next(s["bpp"] for s in summ if s["codec"] == "mridc-full") if any(
            s["codec"] == "mridc-full" for s in summ) else float("nan")
        fig.suptitle(f"tokenizer at full tokens (realism 0, mean {bpp:.4f} bpp) vs codecs at the same bytes",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "tokenizer_quality.png")
        plt.close(fig)
        paths.append("tokenizer_quality.png")
    return paths


def render_markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"# Edge encoder benchmark ({meta['date']})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             (f"1-minute load average: {meta['load_1min_start']} at start, {meta['load_1min_end']} at end "
              f"({meta['cpus']} cores shared with other jobs: absolute times are pessimistic)  "),
             (f"Frames: {', '.join(doc['config']['frames'])}, "
              f"cover-cropped to {'x'.join(map(str, doc['config']['frame_size']))}; "
              f"{doc['config']['repeats']} repeats each, medians."), "",
             ("| backend | encoder ms | whole encode ms | whole encode CPU ms | p90 whole ms | peak RSS MiB | "
              f"model file | bytes @ {doc['config']['bpp']:g} bpp | load before/after |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for b in doc["backends"]:
        label = BACKEND_LABELS.get(b["backend"], b["backend"])
        if b.get("status") != "ok":
            lines.append(f"| {label} | {b.get('status')}: {b.get('error', b.get('reason', ''))} ||||||| ")
            continue
        mf = doc["model_files"].get(b["backend"], {})
        lines.append(f"| {label} | {b['median_ms']['encoder']:.1f} | {b['median_ms']['total']:.1f} | "
                     f"{_fmt_ms(b['median_ms'].get('total_cpu'))} | {b['p90_ms']['total']:.1f} | "
                     f"{b['peak_rss_mib']:.0f} | "
                     f"{mf.get('file', '')} {mf.get('bytes', 0) / 1e6:.2f} MB | {b['bytes_median']} | "
                     f"{b['load_1min_before']} / {b['load_1min_after']} |")
    if doc.get("baseline_rss_mib"):
        lines.append(f"\nPython + numpy + `mridc.edge.encoder` imported, nothing run: {doc['baseline_rss_mib']} MiB.")
    inter = next((b.get("interleaved") for b in doc["backends"] if b.get("interleaved")), None)
    int8_bytes = next((b.get("bytes_median", "") for b in doc["backends"] if b["backend"] == "onnx"), "")
    if inter:
        lines += ["", "## MRIDC (ONNX int8) vs Pillow encoders, interleaved in one process",
                  (f"Load {inter['load_1min']['start']} -> {inter['load_1min']['end']} "
                   f"(max {inter['load_1min']['max']})."),
                  "", "| encoder | settings | median ms | CPU ms | bytes | MRIDC / this (wall) | MRIDC / this (CPU) |",
                  "|---|---|---|---|---|---|---|",
                  (f"| MRIDC int8 whole encode | {doc['config']['bpp']:g} bpp | {inter['median_ms']['mridc']:.1f} | "
                   f"{_fmt_ms(inter.get('median_cpu_ms', {}).get('mridc'))} | {int8_bytes} | 1 | 1 |")]
        for name, ms in inter["median_ms"].items():
            if name == "mridc":
                continue
            s = inter["settings"].get(name, {})
            desc = ", ".join(f"{k}={v}" for k, v in s.items() if k != "bytes")
            lines.append(f"| {name} | {desc} | {ms:.1f} | {_fmt_ms(inter.get('median_cpu_ms', {}).get(name))} | "
                         f"{inter['bytes_median'].get(name, '')} | "
                         f"{inter['ratio_mridc_over'].get(name, float('nan')):.2f} | "
                         f"{inter.get('cpu_ratio_mridc_over', {}).get(name, float('nan')):.2f} |")
    agree = doc.get("token_agreement", {})
    if agree.get("backends"):
        lines += ["", f"## Token agreement vs {agree['reference']} ({doc['config']['eval_images']} images)", "",
                  "| backend | agreement | worst image |", "|---|---|---|"]
        for name, a in agree["backends"].items():
            lines.append(f"| {BACKEND_LABELS.get(name, name)} | {a['agreement'] * 100:.2f}% | "
                         f"{a['min_image'] * 100:.2f}% |")
    quality = doc.get("tokenizer_quality") or {}
    if quality.get("summary"):
        lines += ["", "## Tokenizer at full tokens (realism 0) vs codecs at the same bytes", "",
                  f"Perceptual distance: {quality['perceptual']}. {quality['note']}.", "",
                  "| codec | images fit | mean bpp | PSNR | MS-SSIM | perceptual |", "|---|---|---|---|---|---|"]
        for s in quality["summary"]:
            if not s.get("n_fit"):
                lines.append(f"| {s['codec']} | 0/{s['n']} | | | | |")
                continue
            lines.append(f"| {s['codec']} | {s['n_fit']}/{s['n']} | {s['bpp']:.4f} | {s['psnr']:.2f} | "
                         f"{s['ms_ssim']:.4f} | {s['perceptual']:.4f} |")
    lines += ["", "## Against the targets", ""] + [f"- {t}" for t in doc.get("verdict", [])]
    return "\n".join(lines) + "\n"


def _fmt_ms(value) -> str:
    return "" if value is None else f"{value:.1f}"


def verdict(doc: dict) -> list[str]:
    out = []
    int8 = next((b for b in doc["backends"] if b["backend"] == "onnx" and b.get("status") == "ok"), None)
    if int8:
        ms = int8["median_ms"]["total"]
        out.append(f"int8 encoder + MLM + coding under {TARGET_MS:g} ms on 1 thread: median {ms:.1f} ms wall -> "
                   f"{'met' if ms < TARGET_MS else 'NOT met'} (load {int8['load_1min_before']}-"
                   f"{int8['load_1min_after']} on {doc['meta']['cpus']} cores)")
        cpu_ms = int8["median_ms"].get("total_cpu")
        if cpu_ms is not None:
            out.append(f"same, CPU time of the encode (what an unshared core would take): median {cpu_ms:.1f} ms -> "
                       f"{'met' if cpu_ms < TARGET_MS else 'NOT met'}")
        inter = int8.get("interleaved")
        if inter and "avif" in inter["median_ms"]:
            r = inter["ratio_mridc_over"]["avif"]
            rc = inter.get("cpu_ratio_mridc_over", {}).get("avif", float("nan"))
            out.append(f"faster than AVIF's encoder (default speed 6, 1 thread, full size): MRIDC/AVIF = {r:.2f} wall, "
                       f"{rc:.2f} CPU -> {'met' if r < 1 else 'NOT met'}")
            low = next((n for n in inter["ratio_mridc_over"] if n.startswith("avif@")), None)
            if low:
                r2 = inter["ratio_mridc_over"][low]
                out.append(f"against AVIF at the setting it needs for the same bits ({low}, downscaled): "
                           f"MRIDC/AVIF = {r2:.2f} -> {'faster' if r2 < 1 else 'slower'}")
    return out


def run(args) -> int:
    from mridc.lab.datasets import resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from mridc.shared.zoo import default_models_dir

    models = Path(args.models_dir) if args.models_dir else default_models_dir()
    size = parse_size(args.size)
    names, frames = timing_frames(args.images, args.frames, size)
    if not frames:
        print("edge: no timing frames", file=sys.stderr)
        return 1
    eval_items = resolve(args.eval_images, vtest_stride=args.vtest_stride, limit=args.eval_limit)
    backends = [b for b in args.backends.split(",") if b]
    model_files = {}
    for b in backends:
        path = models / MODEL_FILES[b]
        if path.exists():
            model_files[b] = {"file": MODEL_FILES[b], "bytes": path.stat().st_size}
    if "torch" in model_files:
        model_files["torch"]["note"] = "the whole tokenizer checkpoint (encoder + decoder, fp16)"
    doc: dict = {
        "meta": {"command": command_line(),
                 "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
                 "cpus": os.cpu_count(), "load_1min_start": load_1min()},
        "config": {"frames": names, "frame_size": list(size), "repeats": args.repeats, "warmup": args.warmup,
                   "bpp": args.bpp, "threads": args.threads, "eval_images": len(eval_items),
                   "eval_names": [i.name for i in eval_items]},
        "model_files": model_files, "backends": [],
    }
    with tempfile.TemporaryDirectory(prefix="mridc-edge-bench-") as tmp:
        work = Path(tmp)
        np.savez(work / "frames.npz", **{f"f{i}": f for i, f in enumerate(frames)})
        np.savez(work / "eval.npz", **{f"e{i}": it.image for i, it in enumerate(eval_items)})
        doc["baseline_rss_mib"] = baseline_rss_mib()
        for backend in backends:
            if backend == "litert" and "litert" not in model_files:
                doc["backends"].append({"backend": backend, "status": "skipped",
                                        "reason": f"{MODEL_FILES['litert']} does not exist (make export-litert)"})
                continue
            print(f"edge: {backend} ...", file=sys.stderr, flush=True)
            rec = run_worker(backend, args, work, classical=(backend == "onnx" and not args.no_classical_timing),
                             tokens=bool(eval_items))
            doc["backends"].append(rec)
            if rec.get("status") == "ok":
                print(f"edge: {backend}: encoder {rec['median_ms']['encoder']:.1f} ms, whole "
                      f"{rec['median_ms']['total']:.1f} ms, RSS {rec['peak_rss_mib']} MiB "
                      f"(load {rec['load_1min_before']})", file=sys.stderr, flush=True)
            else:
                print(f"edge: {backend}: {rec.get('error')}", file=sys.stderr, flush=True)
        if eval_items:
            doc["token_agreement"] = token_agreement(work, backends, [i.name for i in eval_items])
    _write(out, doc)
    if eval_items and args.quality_codecs:
        print("edge: tokenizer quality ...", file=sys.stderr, flush=True)
        doc["tokenizer_quality"] = tokenizer_quality(eval_items, args)
    doc["meta"]["load_1min_end"] = load_1min()
    doc["verdict"] = verdict(doc)
    doc["plots"] = plot(doc, out)
    _write(out, doc)
    (out / "summary.md").write_text(render_markdown(doc))
    print(render_markdown(doc))
    return 0


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    return " ".join(["mridc-bench" if prog in ("mridc-bench", "cli.py") else prog, *sys.argv[1:]])


def _write(out: Path, doc: dict) -> None:
    write_json_atomic(out / "edge.json", doc)


def _worker_main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one backend's timed runs (internal: run by `mridc-bench edge`)")
    p.add_argument("--worker", required=True)
    p.add_argument("--frames-npz", required=True)
    p.add_argument("--eval-npz", default=None)
    p.add_argument("--tokens-out", default=None)
    p.add_argument("--classical", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bpp", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models-dir", default=None)
    args = p.parse_args(argv)
    rec = worker(args)
    print(json.dumps(rec, default=json_default))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
