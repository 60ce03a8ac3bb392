"""BPCG ablation (issue 6): token completion, the decoder at equal bits, the realism knob, decode stages.

1. Token accuracy on the masked tokens of the eval images at keep ratios 0.75 / 0.5 / 0.3, with uniform
   random masks and with MLM masks (``EdgeEncoder.encode(keep_ratio=...)``): the predictor's top-1 / top-5
   (one pass), the MaskGIT fill's top-1 (8 confidence-ordered passes), against the most frequent token and
   the nearest kept token. Tokens are the edge encoder's (ONNX int8), i.e. what a stream really carries.
   Also the cosine between each masked token's true code vector and the vector a fill puts there (the
   default ``bpcg`` fill is a soft blend, which top-1 does not see).
2. The decoder at equal bits (the shipped map-guided stream at each rate): without BPCG (nearest fill +
   tokenizer decode), prediction only (fills ``bpcg`` and ``maskgit`` at realism 0), prediction + diffusion
   (realism 0.5 and 1); PSNR, MS-SSIM, the perceptual distance, NIQE; optionally AVIF at the same bytes.
3. The perception-distortion curve: realism 0 ... 1 at ``--curve-bpp``.
4. Decode time per stage of a 768x512 frame at the default settings, with 2 torch threads, and the peak RSS,
   measured in a fresh process (``python -m mridc.bench.ablation_bpcg --stage-timing STREAM``).
5. Side-by-side figure: original, masked-token view, nearest fill, prediction only, full decode, AVIF.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mridc.lab.provenance import peak_rss_mib

from .ablation_common import FIGURE_IMAGES, count_of, finite, fit_frame, fmt, masked_view, mean_of, table


# ---- 1. token accuracy --------------------------------------------------------------------------------
def token_accuracy_one(decoder, tokens: np.ndarray, keep: np.ndarray, maskgit_steps: int = 8, seed: int = 0,
                       blend: float = 0.5) -> dict:
    """Counts over the masked positions of one grid: correct predictions per method and summed cosines.

    The fills are the decoder's own (``decoder.fills``), so this scores exactly what a decode puts there."""
    import torch

    from mridc.cloud.pipeline import DecodeSettings

    masked = ~keep
    n = int(masked.sum())
    out: dict = {"masked": n}
    if n == 0:
        return out
    truth = tokens.astype(np.int64)
    t_tokens = torch.from_numpy(np.where(keep, truth, 0))[None]
    t_keep = torch.from_numpy(keep)[None]
    t_truth = torch.from_numpy(truth)[None]
    t_masked = torch.from_numpy(masked)[None]
    settings = DecodeSettings(seed=seed, predictor_steps=maskgit_steps, blend=blend)

    def fill(name: str):
        return decoder.fills[name](t_tokens, t_keep, settings)

    with torch.no_grad():
        logits = decoder.predictor(t_tokens, t_keep).float()
        probs = logits.softmax(-1)
        top5 = logits.topk(5, dim=-1).indices
        out["predictor_top1"] = int(((top5[..., 0] == t_truth) & t_masked).sum())
        out["predictor_top5"] = int(((top5 == t_truth[..., None]).any(-1) & t_masked).sum())
        nearest, mode = fill("nearest"), fill("mode")
        out["nearest_top1"] = int(((nearest.tokens == t_truth) & t_masked).sum())
        out["mode_top1"] = int(((mode.tokens == t_truth) & t_masked).sum())
        if maskgit_steps:
            out["maskgit_top1"] = int(((fill("maskgit").tokens == t_truth) & t_masked).sum())
        q = decoder.tokenizer.quantizer
        true_vec = q.lookup(t_truth)
        expected = (probs @ q.normalized_codebook()).permute(0, 3, 1, 2)
        vectors = {"nearest": nearest.latent, "mode": mode.latent, "predicted": q.lookup(top5[..., 0]),
                   "expected": expected, "bpcg_blend": fill("bpcg").latent}
        for name, vec in vectors.items():
            cos = torch.nn.functional.cosine_similarity(vec, true_vec, dim=1)
            out[f"cos_{name}"] = float(cos[t_masked].sum())
    return out


def token_accuracy(ctx) -> dict:
    args = ctx.args
    ratios = [float(r) for r in args.keep_ratios.split(",") if r.strip()]
    steps = 8 if args.maskgit_accuracy else 0
    per_image = []
    for item in ctx.images:
        t0 = time.perf_counter()
        for ratio in ratios:
            res = ctx.encoder().encode(item.image, keep_ratio=ratio, rois=item.rois)
            tokens = res.tokens
            rng = np.random.default_rng([args.seed, int(ratio * 1000), len(per_image)])
            n_keep = round(ratio * tokens.size)
            random_keep = np.zeros(tokens.size, bool)
            random_keep[rng.permutation(tokens.size)[:n_keep]] = True
            masks = {"random": random_keep.reshape(tokens.shape), "mlm": res.token_frame.keep_mask}
            for kind, keep in masks.items():
                counts = token_accuracy_one(ctx.decoder, tokens, keep, steps, args.seed)
                per_image.append({"image": item.name, "set": item.set, "keep_ratio": ratio, "mask": kind, **counts})
        print(f"  tokens {item.name} {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    summary = []
    for ratio in ratios:
        for kind in ("random", "mlm"):
            rows = [r for r in per_image if r["keep_ratio"] == ratio and r["mask"] == kind]
            n = sum(r["masked"] for r in rows)
            row = {"keep_ratio": ratio, "mask": kind, "images": len(rows), "masked_tokens": n}
            for key in ("predictor_top1", "predictor_top5", "maskgit_top1", "nearest_top1", "mode_top1"):
                row[key] = sum(r.get(key, 0) for r in rows) / n if n and any(key in r for r in rows) else None
            for key in ("nearest", "mode", "predicted", "expected", "bpcg_blend"):
                row[f"cos_{key}"] = sum(r.get(f"cos_{key}", 0.0) for r in rows) / n if n else None
            summary.append(row)
    return {"per_image": per_image, "summary": summary, "maskgit_steps": steps}


# ---- 2 + 3. the decoder at equal bits and the realism curve ---------------------------------------------
def variants(bpp: float, bpps_curve: list[float], curve: list[float]) -> list[tuple[str, str, float]]:
    """(name, fill, realism) decoded at this rate."""
    out = [("nearest-r0", "nearest", 0.0), ("bpcg-r0", "bpcg", 0.0), ("maskgit-r0", "maskgit", 0.0),
           ("bpcg-r0.5", "bpcg", 0.5), ("bpcg-r1", "bpcg", 1.0)]
    if any(math.isclose(bpp, b) for b in bpps_curve):
        done = {r for _, f, r in out if f == "bpcg"}
        out += [(f"bpcg-r{r:g}", "bpcg", r) for r in curve if not any(math.isclose(r, d) for d in done)]
    return out


VARIANT_LABELS = {
    "nearest-r0": "without BPCG: nearest kept token + tokenizer decode",
    "bpcg-r0": "prediction only: one pass, soft blend (default fill), realism 0",
    "maskgit-r0": "prediction only: MaskGIT 8 steps, realism 0",
    "bpcg-r0.5": "prediction + diffusion, realism 0.5 (default)",
    "bpcg-r1": "prediction + diffusion, realism 1",
    "avif": "AVIF (AV1 bitstream only), same byte budget",
}


def equal_bits(ctx) -> tuple[list[dict], dict]:
    from mridc.edge import mlm

    args = ctx.args
    bpps = [float(b) for b in args.bpcg_bpp.split(",") if b.strip()]
    curve_bpps = [float(b) for b in args.curve_bpp.split(",") if b.strip()]
    curve = [float(r) for r in args.curve.split(",") if r.strip()]
    bpps += [b for b in curve_bpps if not any(math.isclose(b, c) for c in bpps)]
    want_figure = not args.no_figures
    avif = None
    if args.avif_table or want_figure:
        from mridc.lab import codecs as classical

        reason = classical.availability("avif-obu")
        avif = None if reason else classical.make_codec("avif-obu")
        if reason:
            print(f"  {reason}", file=sys.stderr)
    records, figure_data = [], {}
    for index, item in enumerate(ctx.images, 1):
        t_image = time.perf_counter()
        h, w = item.image.shape[:2]
        short = item.name.split("/")[-1]
        niqe_original = ctx.meter.niqe(item.image)
        for bpp in bpps:
            base = {"image": item.name, "set": item.set, "target_bpp": bpp,
                    "target_bytes": mlm.target_bytes_for_bpp(bpp, w, h), "niqe_original": niqe_original}
            in_figure = (want_figure and short in FIGURE_IMAGES and item.redistributable
                         and math.isclose(bpp, args.figure_bpp))
            try:
                res = ctx.encoder().encode(item.image, bpp=bpp, rois=item.rois)
            except ValueError as exc:
                records.append({**base, "variant": "all", "status": "no_fit", "reason": str(exc)})
                continue
            fig = {"image": item.image, "keep": res.token_frame.keep_mask, "bpp": res.bpp} if in_figure else None
            todo = variants(bpp, curve_bpps, curve)
            decodes = ctx.decode_many(res.bitstream, [(f, r) for _, f, r in todo], seed=args.seed)
            for name, fill, realism in todo:
                decoded, stages = decodes[(fill, realism)]
                m = ctx.meter.measure_image(item, decoded, niqe=True)
                records.append({**base, "variant": name, "fill": fill, "realism": realism, "status": "ok",
                                "bytes": len(res.bitstream), "bpp": res.bpp, "keep_ratio": res.keep_ratio,
                                "decode_s": sum(stages.values()), **stages, **m})
                if fig is not None:
                    fig[name] = (decoded, m)
            if avif is not None and (args.avif_table or fig is not None):
                budget_bits = 8 * base["target_bytes"]
                try:
                    payload, decoded, info = avif.encode(item.image, budget_bits)
                    m = ctx.meter.measure_image(item, decoded, niqe=True)
                    if args.avif_table:  # figure-only encodes stay out of the tables (a subset of the images)
                        records.append({**base, "variant": "avif", "status": "ok", "bytes": len(payload),
                                        "bpp": info["bpp"], "downscale": info["downscale"],
                                        "quality": info["quality"], **m})
                    if fig is not None:
                        fig["avif"] = (decoded, {**m, "bpp": info["bpp"], "downscale": info["downscale"]})
                except ValueError as exc:  # BudgetTooSmall
                    if args.avif_table:
                        records.append({**base, "variant": "avif", "status": "no_fit", "reason": str(exc)})
                avif.clear_cache()
            if fig is not None:
                figure_data[item.name] = fig
        print(f"  bpcg [{index}/{len(ctx.images)}] {item.name} {w}x{h} {time.perf_counter() - t_image:.0f}s",
              file=sys.stderr)
    return records, figure_data


def summarise(records: list[dict]) -> list[dict]:
    out = []
    order = ["nearest-r0", "bpcg-r0", "maskgit-r0"]
    names = sorted({r["variant"] for r in records if r["variant"] != "all"},
                   key=lambda v: (order.index(v) if v in order else 10, v))
    for bpp in sorted({r["target_bpp"] for r in records}):
        for name in names:
            rows = [r for r in records if r["target_bpp"] == bpp and r["variant"] == name]
            ok = [r for r in rows if r.get("status") == "ok"]
            if not rows:
                continue
            row = {"target_bpp": bpp, "variant": name, "n": len(rows), "n_ok": len(ok),
                   "realism": ok[0].get("realism") if ok else None}
            for key in ("bpp", "keep_ratio", "psnr", "ms_ssim", "perceptual", "niqe", "niqe_original", "key_psnr",
                        "ped_psnr", "decode_s"):
                row[key] = mean_of(ok, key)
            row["n_niqe"] = count_of(ok, "niqe")
            out.append(row)
    return out


def paired(records: list[dict], a: str, b: str) -> list[dict]:
    """Per rate: on how many images variant ``a`` beats ``b`` (PSNR, MS-SSIM higher; perceptual, NIQE lower)."""
    out = []
    for bpp in sorted({r["target_bpp"] for r in records}):
        ra = {r["image"]: r for r in records if r["target_bpp"] == bpp and r["variant"] == a and r["status"] == "ok"}
        rb = {r["image"]: r for r in records if r["target_bpp"] == bpp and r["variant"] == b and r["status"] == "ok"}
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        row = {"target_bpp": bpp, "a": a, "b": b, "n": len(common)}
        for key, higher in (("psnr", True), ("ms_ssim", True), ("perceptual", False), ("niqe", False)):
            pairs = [(ra[i][key], rb[i][key]) for i in common if ra[i].get(key) is not None
                     and rb[i].get(key) is not None]
            row[f"{key}_wins"] = sum(1 for x, y in pairs if (x > y if higher else x < y))
            row[f"{key}_n"] = len(pairs)
            row[f"{key}_mean_delta"] = float(np.mean([x - y for x, y in pairs])) if pairs else None
        out.append(row)
    return out


# ---- 4. decode time per stage ------------------------------------------------------------------------
def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def stage_timing(stream: bytes, models_dir: str | None, repeats: int = 3, threads: int = 2) -> dict:
    """Median seconds per decode stage for each setting; peak RSS. Run it in a fresh process (see main)."""
    import torch

    from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder

    torch.set_num_threads(threads)
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    decoder = MRIDCDecoder.from_models(models_dir=models_dir, device="cpu")
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    configs = [("default (bpcg, realism 0.5, 8 steps)", DecodeSettings()),
               ("realism 0 (bpcg)", DecodeSettings(realism=0.0)),
               ("realism 1 (bpcg, 8 steps)", DecodeSettings(realism=1.0)),
               ("maskgit, realism 0", DecodeSettings(realism=0.0, fill="maskgit")),
               ("nearest, realism 0", DecodeSettings(realism=0.0, fill="nearest"))]
    results = []
    peak_default = None
    for label, s in configs:
        runs = []
        with torch.no_grad():
            for i in range(repeats + (0 if results else 1)):  # one warm-up decode before the first setting
                t = [time.perf_counter()]
                frame = decoder.validate(stream)
                t.append(time.perf_counter())
                completion = decoder.complete([frame], s)
                t.append(time.perf_counter())
                decoded = decoder.decode_latent(completion.latent)
                t.append(time.perf_counter())
                decoded = decoder.refine(decoded, completion.trust, s)
                t.append(time.perf_counter())
                decoder.to_images(decoded, [frame])
                t.append(time.perf_counter())
                if i or results:
                    runs.append(np.diff(t))
        med = np.median(np.stack(runs), axis=0)
        results.append({"setting": label, "fill": s.fill or decoder.default_fill, "realism": s.realism,
                        "steps": s.steps,
                        "parse_s": med[0], "token_completion_s": med[1], "tokenizer_decode_s": med[2],
                        "diffusion_s": med[3], "to_pixels_s": med[4], "total_s": float(med.sum()),
                        "runs": repeats})
        if peak_default is None:
            peak_default = peak_rss_mib()
    return {"frame": [frame.width, frame.height], "grid": [frame.grid_h, frame.grid_w],
            "keep_ratio": float(frame.keep_mask.mean()), "stream_bytes": len(stream), "torch_threads": threads,
            "model_load_s": load_s, "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded,
            "peak_rss_default_mb": peak_default, "peak_rss_all_mb": peak_rss_mib(), "stages": results}


def timing(ctx) -> dict | None:
    """Encode a 768x512 frame at 0.02 bpp and time its decode in a fresh process (clean peak RSS)."""
    repeats = int(ctx.args.timing_repeats)
    if repeats <= 0:
        return None
    candidates = [im for im in ctx.images if im.image.shape[:2] == (512, 768)]
    if candidates:
        item_name, image = candidates[0].name, candidates[0].image
    else:  # no 768x512 image in the set: stretch the first one to that size
        from PIL import Image

        item_name = ctx.images[0].name + " (resized)"
        image = np.asarray(Image.fromarray(fit_frame(ctx.images[0].image)).resize((768, 512)))
    res = ctx.encoder().encode(image, bpp=0.02)
    with tempfile.NamedTemporaryFile(suffix=".mrd", delete=False) as f:
        f.write(res.bitstream)
        stream_path = f.name
    cmd = [sys.executable, "-m", "mridc.bench.ablation_bpcg", "--stage-timing", stream_path,
           "--repeats", str(repeats), "--threads", "2"]
    if ctx.models_dir:
        cmd += ["--models-dir", str(ctx.models_dir)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env={**os.environ})
    finally:
        os.unlink(stream_path)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout)
    out["image"] = item_name
    try:
        out["load_average_after"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


# ---- 5. figures -------------------------------------------------------------------------------------
def side_by_side(data: dict, stride: int, out: Path) -> Path:
    from .plots import _pyplot

    plt = _pyplot()
    names = sorted(data)
    columns = [("nearest-r0", "without BPCG (nearest fill)"), ("bpcg-r0", "prediction only (realism 0)"),
               ("bpcg-r1", "full decode (realism 1)"), ("avif", "AVIF, same bytes")]
    fig, axes = plt.subplots(len(names), 2 + len(columns), figsize=(2.7 * (2 + len(columns)), 2.1 * len(names)),
                             dpi=100, squeeze=False)
    for row, name in zip(axes, names):
        d = data[name]
        panels = [(d["image"], f"{name.split('/')[-1]} original"),
                  (masked_view(d["nearest-r0"][0], d["keep"], stride) if "nearest-r0" in d else d["image"],
                   f"sent tokens, keep {d['keep'].mean():.2f}, {d['bpp']:.4f} bpp")]
        for key, title in columns:
            if key in d:
                img, m = d[key]
                extra = f", {m['bpp']:.4f} bpp" if key == "avif" else ""
                perc = "-" if m.get("perceptual") is None else f"{m['perceptual']:.3f}"
                niqe = "-" if m.get("niqe") is None else f"{m['niqe']:.1f}"
                panels.append((img, f"{title}{extra}\n{m['psnr']:.2f} dB, perc {perc}, NIQE {niqe}"))
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    path = out / "figures" / "bpcg_side_by_side.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pd_curve(summary: list[dict], curve_bpps: list[float], out: Path) -> Path | None:
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    drawn = False
    for bpp in curve_bpps:
        rows = sorted([r for r in summary if math.isclose(r["target_bpp"], bpp) and r["variant"].startswith("bpcg-r")
                       and r["psnr"] is not None], key=lambda r: r["realism"])
        if not rows:
            continue
        drawn = True
        for ax, metric in zip(axes, ("perceptual", "niqe")):
            xs, ys = [r["psnr"] for r in rows], [r[metric] for r in rows]
            (line,) = ax.plot(xs, ys, "o-", label=f"MRIDC realism 0..1, {bpp:g} bpp")
            for r in rows:
                ax.annotate(f"r={r['realism']:g}", (r["psnr"], r[metric]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=line.get_color())
            for name, marker in (("nearest-r0", "s"), ("maskgit-r0", "^"), ("avif", "D")):
                other = [r for r in summary if math.isclose(r["target_bpp"], bpp) and r["variant"] == name
                         and r.get(metric) is not None and r["n_ok"] == r["n"]]
                for r in other:
                    ax.plot(r["psnr"], r[metric], marker, color=line.get_color(), markerfacecolor="white",
                            label=f"{name}, {bpp:g} bpp")
    if not drawn:
        plt.close(fig)
        return None
    originals = [r["niqe_original"] for r in summary if r.get("niqe_original") is not None]
    if originals:
        axes[1].axhline(originals[0], color="grey", linestyle=":", label="original images (mean NIQE)")
    axes[0].set_ylabel("perceptual distance (MNv2-LPIPS, lower is better)")
    axes[1].set_ylabel("NIQE (lower = more natural)")
    for ax in axes:
        ax.set_xlabel("PSNR (dB, RGB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Perception-distortion: the realism knob (means over the eval images)", fontsize=10)
    fig.tight_layout()
    path = out / "figures" / "perception_distortion.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- the part -----------------------------------------------------------------------------------------
def run(ctx) -> dict:
    args = ctx.args
    t0 = time.perf_counter()
    tokens = token_accuracy(ctx)
    t1 = time.perf_counter()
    records, figure_data = equal_bits(ctx)
    t2 = time.perf_counter()
    summary = summarise(records)
    stage = timing(ctx)
    t3 = time.perf_counter()
    curve_bpps = [float(b) for b in args.curve_bpp.split(",") if b.strip()]
    result = {
        "settings": {"bpp": [float(b) for b in args.bpcg_bpp.split(",") if b.strip()], "curve_bpp": curve_bpps,
                     "curve_realism": [float(r) for r in args.curve.split(",") if r.strip()],
                     "keep_ratios": [float(r) for r in args.keep_ratios.split(",") if r.strip()],
                     "seed": args.seed, "variants": VARIANT_LABELS},
        "token_accuracy": finite(tokens),
        "equal_bits": {"records": finite(records), "summary": finite(summary),
                       "paired": finite(paired(records, "bpcg-r0", "nearest-r0")
                                        + paired(records, "maskgit-r0", "nearest-r0")
                                        + paired(records, "bpcg-r1", "bpcg-r0"))},
        "timing": finite(stage),
        "wall_s": {"token_accuracy": t1 - t0, "equal_bits": t2 - t1, "timing": t3 - t2},
        "figures": [],
    }
    if not args.no_figures:
        try:
            stride = ctx.encoder().stride
            if figure_data:
                result["figures"].append(str(side_by_side(figure_data, stride, ctx.out).relative_to(ctx.out)))
            path = pd_curve(summary, curve_bpps, ctx.out)
            if path is not None:
                result["figures"].append(str(path.relative_to(ctx.out)))
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the numbers
            result["figure_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  bpcg figure failed: {result['figure_error']}", file=sys.stderr)
    return result


def render_markdown(result: dict) -> str:
    lines = ["## BPCG (issue 6)\n", "### Token prediction accuracy on masked tokens\n",
             ("Pooled over all masked tokens of the eval images. `predictor`: one pass of the bidirectional "
              "transformer; `maskgit`: top-1 of the final MaskGIT fill ("
              + (f"{result['token_accuracy']['maskgit_steps']} confidence-ordered passes"
                 if result["token_accuracy"]["maskgit_steps"] else "not run here: `--maskgit-accuracy`")
              + "); `nearest`: the nearest kept token; `mode`: the "
              "most frequent token of the shipped prior. `cos`: mean cosine between the true code vector and the "
              "filled one (`predicted`: the predictor's top-1; `expected`: its expected code vector; `blend`: the "
              "default bpcg fill, 0.5 expected + 0.5 nearest).\n")]
    rows = []
    for r in result["token_accuracy"]["summary"]:
        rows.append([f"{r['keep_ratio']:g}", r["mask"], r["masked_tokens"], fmt(r["predictor_top1"], 3),
                     fmt(r["predictor_top5"], 3), fmt(r["maskgit_top1"], 3), fmt(r["nearest_top1"], 3),
                     fmt(r["mode_top1"], 3), fmt(r["cos_nearest"], 3), fmt(r["cos_predicted"], 3),
                     fmt(r["cos_expected"], 3), fmt(r["cos_bpcg_blend"], 3)])
    lines.append(table(["keep", "mask", "masked tokens", "predictor top-1", "predictor top-5", "maskgit top-1",
                        "nearest top-1", "mode top-1", "cos nearest", "cos predicted", "cos expected",
                        "cos blend"], rows))
    eq = result["equal_bits"]
    lines.append("\n### The decoder at equal bits (the map-guided stream of each rate)\n")
    lines.append("\n".join(f"- `{k}`: {v}" for k, v in result["settings"]["variants"].items()) + "\n")
    rows = []
    for r in eq["summary"]:
        rows.append([f"{r['target_bpp']:g}", r["variant"], f"{r['n_ok']}/{r['n']}", fmt(r["bpp"], 4),
                     fmt(r["psnr"]), fmt(r["ms_ssim"], 4), fmt(r["perceptual"], 4), fmt(r["niqe"]),
                     fmt(r["key_psnr"]), fmt(r["decode_s"])])
    lines.append(table(["bpp", "variant", "n", "bpp (measured)", "PSNR", "MS-SSIM", "perceptual", "NIQE",
                        "key PSNR", "decode s"], rows))
    if eq["summary"] and eq["summary"][0].get("niqe_original") is not None:
        lines.append(f"\nNIQE of the original images (mean): {fmt(eq['summary'][0]['niqe_original'])}.")
    lines.append("\n#### Paired over images\n")
    rows = []
    for p in eq["paired"]:
        cells = [f"{p['target_bpp']:g}", f"{p['a']} vs {p['b']}"]
        for key, digits in (("psnr", 2), ("ms_ssim", 4), ("perceptual", 4), ("niqe", 2)):
            cells.append(f"{p[f'{key}_wins']}/{p[f'{key}_n']} ({fmt(p[f'{key}_mean_delta'], digits)})"
                         if p[f"{key}_n"] else "-")
        rows.append(cells)
    lines.append(table(["bpp", "a vs b", "PSNR wins (delta)", "MS-SSIM wins (delta)", "perceptual wins (delta)",
                        "NIQE wins (delta)"], rows))
    t = result.get("timing")
    if t and "stages" in t:
        lines.append(f"\n### Decode time per stage ({t['frame'][0]}x{t['frame'][1]}, grid {t['grid'][0]}x"
                     f"{t['grid'][1]}, keep {t['keep_ratio']:.2f}, {t['stream_bytes']} B, {t['torch_threads']} "
                     f"torch threads, median of {t['stages'][0]['runs']} runs after one warm-up decode, fresh process; "
                     f"load average {fmt(t.get('load_average_after'))} just after)\n")
        rows = [[s["setting"], fmt(s["token_completion_s"], 3), fmt(s["tokenizer_decode_s"], 3),
                 fmt(s["diffusion_s"], 3), fmt(s["parse_s"] + s["to_pixels_s"], 3), fmt(s["total_s"], 3)]
                for s in t["stages"]]
        lines.append(table(["setting", "token completion s", "tokenizer decode s", "diffusion s",
                            "parse + to pixels s", "total s"], rows))
        lines.append(f"\nModel load {fmt(t['model_load_s'])} s; RSS {fmt(t['rss_start_mb'], 0)} MB at start, "
                     f"{fmt(t['rss_after_load_mb'], 0)} MB after loading the models; peak RSS "
                     f"{fmt(t['peak_rss_default_mb'], 0)} MB after the default setting, "
                     f"{fmt(t['peak_rss_all_mb'], 0)} MB after all settings (VmHWM of the timing process).")
    elif t:
        lines.append(f"\nStage timing failed: {t.get('error')}")
    if result.get("figures"):
        lines.append("\n" + "\n".join(f"![BPCG figure]({p})" for p in result["figures"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="decode-stage timing of one MRD stream in this (fresh) process")
    p.add_argument("--stage-timing", required=True, metavar="STREAM", help="an MRD file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", default=None)
    args = p.parse_args(argv)
    result = stage_timing(Path(args.stage_timing).read_bytes(), args.models_dir, args.repeats, args.threads)
    print(json.dumps(finite(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
