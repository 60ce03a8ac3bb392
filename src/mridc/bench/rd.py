"""``mridc-bench rd``: rate-distortion-perception of MRIDC against JPEG, WebP, AVIF and JPEG XL.

For every image, codec and target bpp: encode under the budget (classical codecs search quality and
downscale factor; see ``lab/codecs.py``), decode, and measure PSNR, MS-SSIM, the perceptual distances
(MNv2-LPIPS, and the standard LPIPS-Alex, LPIPS-VGG and DISTS where their weights are present), NIQE and PSNR
inside ROIs. Writes ``rd.json`` (every measurement, rewritten after each image so a stopped
run keeps what it measured), ``plots/*.png`` (bpp vs each metric per set, one curve per codec) and
``report.html`` (tables, plots, side-by-side crops).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from mridc.lab.meter import ALL_METRICS, Meter
from mridc.lab.provenance import machine, package_versions, write_json_atomic

HELP = "rate-distortion-perception curves: MRIDC vs JPEG/WebP/AVIF/JPEG XL under bit budgets"
DEFAULT_BPP = "0.01,0.015,0.02,0.03,0.05"
DEFAULT_CODECS = "mridc,jpeg,webp,avif,avif-obu,jxl"
# The versions that move rate-distortion numbers: the classical codecs, the metrics, the decoder runtime.
RD_PACKAGES = ("pillow", "pillow-jxl-plugin", "numpy", "torch", "pytorch-msssim", "scipy")
SUMMARY_METRICS = ("psnr", "ms_ssim", "perceptual", "lpips_alex", "lpips_vgg", "dists", "niqe", "roi_psnr")
METRIC_NAMES = {"psnr": "PSNR (dB)", "ms_ssim": "MS-SSIM", "perceptual": "perceptual distance (lower is better)",
                "lpips_alex": "LPIPS-Alex v0.1 (lower is better)", "lpips_vgg": "LPIPS-VGG v0.1 (lower is better)",
                "dists": "DISTS (lower is better)", "niqe": "NIQE (lower is better)",
                "roi_psnr": "PSNR inside ROIs (dB)"}
METRIC_DIGITS = {"psnr": 2, "ms_ssim": 4, "perceptual": 4, "lpips_alex": 4, "lpips_vgg": 4, "dists": 4, "niqe": 2,
                 "roi_psnr": 2}
# Which distances share a network with a training loss (a VGG LPIPS term may become a tokenizer loss).
NETWORK_NOTE = ("LPIPS-VGG uses the VGG16 backbone of a VGG LPIPS training loss, and DISTS uses the same VGG16 "
                "features, so both can be optimised for by such a loss; LPIPS-Alex (AlexNet) and MNv2-LPIPS "
                "(MobileNetV2) share no network with it.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="+", default=["photos-eval"],
                   help="set names (photos-eval, kodak, vtest), folders, image or video files")
    p.add_argument("--bpp", default=DEFAULT_BPP, help=f"target bits per pixel, comma-separated ({DEFAULT_BPP})")
    p.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated ({DEFAULT_CODECS})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help="subset of " + ",".join(ALL_METRICS))
    p.add_argument("--max-side", type=int, default=768, help="fit larger photos into this (0: full size)")
    p.add_argument("--vtest-stride", type=int, default=30, help="every N-th evaluation frame of vtest (500-794)")
    p.add_argument("--limit", type=int, default=None, help="first N images only (smoke runs)")
    p.add_argument("--select", choices=("psnr", "ms_ssim"), default="psnr",
                   help="what the classical search maximises among settings that fit")
    p.add_argument("--avif-speed", type=int, default=6)
    p.add_argument("--jxl-effort", type=int, default=7)
    p.add_argument("--realism", default="0,0.5,1", help="MRIDC realism settings, comma-separated")
    p.add_argument("--mridc-scale", default="1,auto",
                   help="MRIDC resolution scales, comma-separated: 1 (full-resolution grid, masking only), "
                        "a factor (above 1: a finer grid), auto, auto:MAX (auto up to a finer grid of MAX)")
    p.add_argument("--models-dir", default=None, help="MRIDC models folder (default: shipped / $MRIDC_MODELS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perceptual-weights", default=None, help="MobileNetV2 weights file for the perceptual distance")
    p.add_argument("--lpips-weights", default=None,
                   help="folder with the LPIPS/DISTS weights (default: $MRIDC_LPIPS_DISTS_WEIGHTS or "
                        "weights/lpips_dists in the shared data folder); absent: those metrics are None")
    p.add_argument("--crop-size", type=int, default=192)
    p.add_argument("--crop-bpp", default="0.02,0.03", help="target bpps shown as crops in the report ('' for none)")
    p.add_argument("--public-crops-only", action="store_true",
                   help="no crops of images whose licence forbids redistribution (for committed reports)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--replot", action="store_true", help="only remake plots and reports from OUT/rd.json")


# ---- the MRIDC adapter -------------------------------------------------------------------------------
class MRIDCCodec:
    """The ``Codec`` protocol over ``EdgeEncoder`` + ``MRIDCDecoder`` at one realism setting."""

    def __init__(self, encoder, decoder, realism: float, seed: int = 0, scale: str | float | None = None):
        self.encoder, self.decoder, self.realism, self.seed = encoder, decoder, realism, seed
        self.scale = None if scale in (None, "1", 1, 1.0) else scale
        tag = "" if self.scale is None else f"-s{self.scale}"
        self.name = f"mridc{tag}-r{realism:g}"
        self.label = f"MRIDC (realism {realism:g}{', scale ' + str(self.scale) if self.scale else ''})"

    def encode(self, image: np.ndarray, budget_bits: int) -> tuple[bytes, np.ndarray, dict]:
        height, width = image.shape[:2]
        pixels = height * width
        result = self.encoder.encode(image, bpp=budget_bits / pixels, scale=self.scale)
        payload = bytes(result.bitstream)
        t0 = time.perf_counter()
        decoded = np.asarray(self.decoder.decode(payload, realism=self.realism, seed=self.seed), dtype=np.uint8)
        bits = len(payload) * 8
        info = {"codec": self.name, "label": self.label, "bits": bits, "bytes": len(payload),
                "bpp": bits / pixels, "budget_bits": int(budget_bits), "target_bpp": budget_bits / pixels,
                "over_budget": bits > budget_bits, "realism": self.realism, "seed": self.seed, "scale": self.scale,
                "encoder_timings": dict(getattr(result, "timings", {}) or {}),
                "decode_s": time.perf_counter() - t0}
        return payload, decoded, info


def mridc_codecs(realisms: list[float], models_dir: str | None, seed: int,
                 scales: tuple = (None,)) -> tuple[list, str | None]:
    """The MRIDC codecs, or ([], reason) when the code or the models are not there yet."""
    try:
        from mridc.cloud.pipeline import MRIDCDecoder
        from mridc.edge.encoder import EdgeEncoder
    except ImportError as exc:
        return [], f"mridc skipped: encoder/decoder modules not importable yet ({exc})"
    try:
        encoder = EdgeEncoder.from_bundle(models_dir=models_dir)
        decoder = MRIDCDecoder.from_models(models_dir=models_dir, device="cpu")
    except Exception as exc:  # noqa: BLE001  (missing or incompatible models: any cause means skip, said aloud)
        return [], f"mridc skipped: models not loadable ({type(exc).__name__}: {exc})"
    return [MRIDCCodec(encoder, decoder, r, seed, scale) for scale in scales for r in realisms], None


def build_codecs(names: list[str], args) -> tuple[list, dict[str, str]]:
    from mridc.lab import codecs as classical

    out, skipped = [], {}
    for name in names:
        if name == "mridc":
            scales = tuple(None if v in ("1", "1.0") else (v if v.startswith("auto") else float(v))
                           for v in getattr(args, "mridc_scale", "1").split(",") if v)
            found, reason = mridc_codecs([float(r) for r in args.realism.split(",") if r], args.models_dir, args.seed,
                                         scales)
            out += found
            if reason:
                skipped["mridc"] = reason
            continue
        reason = classical.availability(name)
        if reason:
            skipped[name] = reason
            continue
        kw = {"select": args.select}
        if name in ("avif", "avif-obu"):
            kw["speed"] = args.avif_speed
        if name == "jxl":
            kw["effort"] = args.jxl_effort
        out.append(classical.make_codec(name, **kw))
    return out, skipped


# ---- measurements -------------------------------------------------------------------------------------
def detail_crop(image: np.ndarray, size: int, boxes: list) -> list[int]:
    """A crop box: around the largest ROI if any, else the window with the most gradient energy."""
    height, width = image.shape[:2]
    size = min(size, height, width)
    if boxes:
        x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    else:
        gray = image.astype(np.float32).mean(axis=2)
        energy = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
        integral = np.pad(energy, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        step = max(8, size // 8)
        best, cx, cy = -1.0, width // 2, height // 2
        for y in range(0, energy.shape[0] - size + 1, step):
            for x in range(0, energy.shape[1] - size + 1, step):
                s = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
                if s > best:
                    best, cx, cy = s, x + size // 2, y + size // 2
    x0 = int(min(max(cx - size // 2, 0), width - size))
    y0 = int(min(max(cy - size // 2, 0), height - size))
    return [x0, y0, x0 + size, y0 + size]


def _save_crop(image: np.ndarray, box: list[int], path: Path) -> str:
    from PIL import Image

    x0, y0, x1, y1 = box
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).save(path, optimize=True)
    return path.as_posix()


def summarise(records: list[dict], images: list[dict]) -> list[dict]:
    """Mean over images per (set, codec, target bpp), plus an "all" set. Means only over images that fit."""
    set_sizes: dict[str, int] = {}
    for im in images:
        set_sizes[im["set"]] = set_sizes.get(im["set"], 0) + 1
    set_sizes["all"] = len(images)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for set_name in (r["set"], "all"):
            groups.setdefault((set_name, r["codec"], r["target_bpp"]), []).append(r)
    rows = []
    for (set_name, codec, target), recs in sorted(groups.items()):
        ok = [r for r in recs if r["status"] == "ok"]
        row = {"set": set_name, "codec": codec, "target_bpp": target, "n": set_sizes[set_name], "n_fit": len(ok),
               "bpp": float(np.mean([r["bpp"] for r in ok])) if ok else None}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in ok if r.get(metric) is not None and math.isfinite(r[metric])]
            row[metric] = float(np.mean(values)) if values else None
            if metric == "roi_psnr":
                row["n_roi"] = len(values)
        row["downscale_median"] = float(np.median([r["downscale"] for r in ok])) if ok and "downscale" in ok[0] \
            else None
        rows.append(row)
    return rows


# ---- run ----------------------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from mridc.lab import codecs as classical
    from mridc.lab.datasets import resolve

    out = Path(args.out)
    if args.replot:
        write_reports(out)
        return 0
    torch.set_num_threads(max(1, args.threads))
    out.mkdir(parents=True, exist_ok=True)
    bpps = [float(b) for b in args.bpp.split(",") if b]
    crop_bpps = {float(b) for b in args.crop_bpp.split(",") if b}
    metrics = {m for m in args.metrics.split(",") if m}
    unknown = metrics - set(ALL_METRICS)
    if unknown:
        print(f"unknown metrics: {sorted(unknown)}; known: {ALL_METRICS}", file=sys.stderr)
        return 2

    images = resolve(args.images, max_side=args.max_side, vtest_stride=args.vtest_stride, limit=args.limit)
    codec_list, skipped = build_codecs([c for c in args.codecs.split(",") if c], args)
    for reason in skipped.values():
        print(reason, file=sys.stderr)
    if not codec_list:
        print("no codec can run; nothing measured", file=sys.stderr)
        return 1
    meter = Meter(metrics, args.perceptual_weights, standard_weights=getattr(args, "lpips_weights", None))

    meta = {
        "command": "mridc-bench rd " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["rd"] else " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": package_versions(RD_PACKAGES, image_libraries=True),
        "bpp_targets": bpps, "select": args.select, "max_side": args.max_side,
        "perceptual": meter.perceptual_name,
        "standard_perceptual": meter.standard_labels(),
        "network_note": NETWORK_NOTE,
        "codecs": {getattr(c, "name", "?"): getattr(c, "label", "") for c in codec_list},
        "bits": "len(payload) * 8 per original pixel; classical payloads stripped of ICC/EXIF/XMP, "
                "downscaled payloads carry 4 bytes of original size",
    }
    image_meta, records, crops = [], [], []
    print(f"rd: {len(images)} images x {len(codec_list)} codecs x {len(bpps)} rates -> {out}", file=sys.stderr)
    for index, item in enumerate(images, 1):
        t_image = time.perf_counter()
        ref = item.image
        entry = {"name": item.name, "set": item.set, "source": item.source, "size": [ref.shape[1], ref.shape[0]],
                 "boxes": item.boxes, "redistributable": item.redistributable}
        if "niqe" in metrics:
            entry["niqe_original"] = meter.niqe(ref)
        image_meta.append(entry)
        show_crops = crop_bpps and (item.redistributable or not args.public_crops_only)
        crop_box = detail_crop(ref, args.crop_size, item.boxes) if show_crops else None
        slug = item.name.replace("/", "__")
        if show_crops:
            crops.append({"image": item.name, "codec": "original", "target_bpp": None, "box": crop_box,
                          "path": _save_crop(ref, crop_box, out / "crops" / f"{slug}__original.png")})
        for codec in codec_list:
            for bpp in bpps:
                budget = math.floor(bpp * item.pixels)
                rec = {"image": item.name, "set": item.set, "codec": codec.name, "target_bpp": bpp,
                       "budget_bits": budget}
                t0 = time.perf_counter()
                try:
                    _payload, decoded, info = codec.encode(ref, budget)
                except classical.BudgetTooSmall as exc:
                    rec.update(status="no_fit", reason=str(exc))
                    records.append(rec)
                    continue
                rec["codec_s"] = time.perf_counter() - t0
                tried = info.pop("tried", None)
                rec.update({k: v for k, v in info.items() if k not in ("codec", "label", "budget_bits", "target_bpp")})
                if tried:
                    rec["tried"] = [[t["downscale"], t["quality"], t["bytes"], round(t[args.select], 4)]
                                    for t in tried]
                rec.update(status="ok", **meter.measure(ref, decoded, item.boxes))
                records.append(rec)
                if show_crops and bpp in crop_bpps:
                    crops.append({"image": item.name, "codec": codec.name, "target_bpp": bpp, "box": crop_box,
                                  "bpp": rec["bpp"], "psnr": rec.get("psnr"), "downscale": rec.get("downscale"),
                                  "path": _save_crop(decoded, crop_box,
                                                     out / "crops" / f"{slug}__{codec.name}__{bpp:g}.png")})
            if hasattr(codec, "clear_cache"):
                codec.clear_cache()
        print(f"[{index}/{len(images)}] {item.name} {ref.shape[1]}x{ref.shape[0]} "
              f"{time.perf_counter() - t_image:.1f}s", file=sys.stderr)
        _write_json(out, meta, skipped, image_meta, records, crops)

    _write_json(out, meta, skipped, image_meta, records, crops)
    write_reports(out)
    return 0


def write_reports(out: Path) -> None:
    """Plots, report.html and summary.md from ``out/rd.json`` (also after a stopped run: ``--replot``)."""
    from .plots import rd_plot

    doc = json.loads((out / "rd.json").read_text())
    meta, skipped, image_meta = doc["meta"], doc["skipped"], doc["images"]
    summary = summarise(doc["records"], image_meta)
    plots = []
    for set_name in sorted({r["set"] for r in summary}):
        rows = [r for r in summary if r["set"] == set_name]
        for metric in SUMMARY_METRICS:
            if metric == "roi_psnr" and not any(r.get("roi_psnr") is not None for r in rows):
                continue
            reference = None
            if metric == "niqe":
                vals = [im["niqe_original"] for im in image_meta if (set_name == "all" or im["set"] == set_name)
                        and im.get("niqe_original") is not None]
                reference = float(np.mean(vals)) if vals else None
            label = meta.get("perceptual") if metric == "perceptual" else None
            if metric in ("lpips_alex", "lpips_vgg", "dists") and not any(r.get(metric) is not None for r in rows):
                continue
            path = rd_plot(rows, metric, out / "plots" / f"{set_name}_{metric}.png",
                           title=f"{set_name} ({rows[0]['n']} images)", metric_label=label, reference=reference)
            if path:
                plots.append({"set": set_name, "metric": metric, "path": path.relative_to(out).as_posix()})
    crops = [{**c, "path": (out / c["path"]).as_posix()} for c in doc["crops"]]
    (out / "report.html").write_text(render_html(meta, skipped, image_meta, summary, plots, crops, out))
    (out / "summary.md").write_text(render_markdown(meta, skipped, summary))
    print(f"wrote {out / 'rd.json'}, {len(plots)} plots, {out / 'report.html'}, {out / 'summary.md'}",
          file=sys.stderr)


def _write_json(out: Path, meta, skipped, image_meta, records, crops) -> list[dict]:
    summary = summarise(records, image_meta)
    crops_rel = [{**c, "path": Path(c["path"]).relative_to(out).as_posix()} for c in crops]
    doc = {"meta": meta, "skipped": skipped, "images": image_meta, "summary": summary, "records": records,
           "crops": crops_rel}
    write_json_atomic(out / "rd.json", doc)
    return summary


# ---- Markdown tables ---------------------------------------------------------------------------------
def render_markdown(meta, skipped, summary) -> str:
    """One table per set and metric: rows are target bpp, columns codecs; "(k/n)" marks a mean over the k
    images (of n) on which the codec fits the budget."""
    lines = [f"Measured by `{meta['command']}` on {meta['date']} ({meta['machine']}).", "",
             f"Perceptual distance: {meta['perceptual']}. Bits: {meta['bits']}.", ""]
    standard = meta.get("standard_perceptual") or {}
    if standard:
        lines += ["Standard distances: " + "; ".join(f"{k}: {v}" for k, v in standard.items()) + ". "
                  + meta.get("network_note", NETWORK_NOTE), ""]
    lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
    names, digits = METRIC_NAMES, METRIC_DIGITS
    for set_name in sorted({r["set"] for r in summary}):
        rows = [r for r in summary if r["set"] == set_name]
        codecs = sorted({r["codec"] for r in rows})
        targets = sorted({r["target_bpp"] for r in rows})
        for metric in SUMMARY_METRICS:
            if not any(r.get(metric) is not None for r in rows):
                continue
            lines += ["", f"### {set_name}: {names[metric]} ({rows[0]['n']} images)", "",
                      "| target bpp | " + " | ".join(codecs) + " |", "|---" * (len(codecs) + 1) + "|"]
            for target in targets:
                cells = []
                for codec in codecs:
                    r = next((r for r in rows if r["codec"] == codec and r["target_bpp"] == target), None)
                    if r is None or r.get(metric) is None:
                        cells.append("no fit" if r is not None and r["n_fit"] == 0 else "-")
                        continue
                    count = r["n_roi"] if metric == "roi_psnr" else r["n_fit"]
                    total = r["n_fit"] if metric == "roi_psnr" else r["n"]
                    cells.append(_fmt(r[metric], digits[metric]) + ("" if count == total else f" ({count}/{total})"))
                lines.append(f"| {target:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- HTML report --------------------------------------------------------------------------------------
def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def render_html(meta, skipped, image_meta, summary, plots, crops, out: Path) -> str:
    e = html.escape
    parts = [
        ("<!doctype html><html><head><meta charset='utf-8'><title>mridc-bench rd</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
        ".crops{display:flex;flex-wrap:wrap;gap:6px}.crops figure{margin:0;font-size:11px;text-align:center}"
        "img.crop{image-rendering:pixelated;width:256px}img.plot{width:460px}</style></head><body>"),
        "<h1>Rate-distortion-perception report</h1>",
        (f"<p><b>Command:</b> <code>{e(meta['command'])}</code><br><b>Date:</b> {e(meta['date'])}<br>"
        f"<b>Machine:</b> {e(meta['machine'])}<br><b>Perceptual distance:</b> {e(str(meta['perceptual']))}"
        + "".join(f"<br><b>{e(k)}:</b> {e(str(v))}" for k, v in (meta.get("standard_perceptual") or {}).items())
        + (f"<br><b>Networks:</b> {e(meta.get('network_note', NETWORK_NOTE))}" if meta.get("standard_perceptual")
           else "")
        + f"<br><b>Bits:</b> {e(meta['bits'])}<br><b>Classical search objective:</b> {e(meta['select'])}</p>"),
        "<h2>Codecs</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in meta["codecs"].items())
        + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in skipped.items()) + "</ul>",
        ("<p>Means over the images on which the codec fits the budget (n_fit of n). Hollow points in the plots "
        "mark means over a subset.</p>"),
    ]
    for set_name in sorted({r["set"] for r in summary}):
        rows = [r for r in summary if r["set"] == set_name]
        parts.append(f"<h2>Set: {e(set_name)}</h2><table><tr><th>codec</th><th>target bpp</th><th>bpp</th>"
                     "<th>n_fit/n</th><th>PSNR</th><th>MS-SSIM</th><th>perceptual</th><th>LPIPS-Alex</th>"
                     "<th>LPIPS-VGG</th><th>DISTS</th><th>NIQE</th>"
                     "<th>ROI PSNR</th><th>downscale (median)</th></tr>")
        for r in sorted(rows, key=lambda r: (r["target_bpp"], r["codec"])):
            parts.append(f"<tr><td>{e(r['codec'])}</td><td>{r['target_bpp']:g}</td><td>{_fmt(r['bpp'], 4)}</td>"
                         f"<td>{r['n_fit']}/{r['n']}</td><td>{_fmt(r['psnr'])}</td><td>{_fmt(r['ms_ssim'], 4)}</td>"
                         f"<td>{_fmt(r['perceptual'], 4)}</td><td>{_fmt(r.get('lpips_alex'), 4)}</td>"
                         f"<td>{_fmt(r.get('lpips_vgg'), 4)}</td><td>{_fmt(r.get('dists'), 4)}</td>"
                         f"<td>{_fmt(r['niqe'])}</td><td>{_fmt(r['roi_psnr'])}</td>"
                         f"<td>{_fmt(r['downscale_median'])}</td></tr>")
        parts.append("</table><p>" + "".join(f"<img class='plot' src='{e(p['path'])}'>"
                                               for p in plots if p["set"] == set_name) + "</p>")
    if crops:
        parts.append("<h2>Crops (same region of every decode; shown at 256 px, nearest neighbour)</h2>")
        by_image: dict[str, list[dict]] = {}
        for c in crops:
            by_image.setdefault(c["image"], []).append(c)
        for name, items in by_image.items():
            original = next(c for c in items if c["codec"] == "original")
            parts.append(f"<h3>{e(name)}</h3>")
            for target in sorted({c["target_bpp"] for c in items if c["target_bpp"] is not None}):
                figs = [(f"<figure><img class='crop' src='{e(_rel(original['path'], out))}'>"
                        f"<figcaption>original</figcaption></figure>")]
                for c in (c for c in items if c["target_bpp"] == target):
                    extra = f", 1/{c['downscale']:g} size" if c.get("downscale") not in (None, 1.0) else ""
                    figs.append(f"<figure><img class='crop' src='{e(_rel(c['path'], out))}'><figcaption>"
                                f"{e(c['codec'])} @ {c['bpp']:.4f} bpp<br>PSNR {_fmt(c['psnr'])} dB{e(extra)}"
                                "</figcaption></figure>")
                parts.append(f"<p>target {target:g} bpp</p><div class='crops'>{''.join(figs)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _rel(path: str, out: Path) -> str:
    p = Path(path)
    return p.relative_to(out).as_posix() if p.is_absolute() or str(p).startswith(str(out)) else p.as_posix()
