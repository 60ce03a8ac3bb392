"""MLM ablation (issue 5): which tokens to send, at equal bytes.

Four masking policies, each rate-controlled to the same byte budget by the same search over the kept-token
count (``EdgeEncoder.rate.fit``: the largest count whose real stream fits, static token coder during the
search, then the adaptive coder if it is smaller, exactly as ``EdgeEncoder.encode``):

- ``map``: the shipped map-guided masking (key regions first, one anchor per 4x4 block, then priority);
- ``map-no-anchors``: the same with ``MaskingConfig(anchor_spacing=0)``;
- ``random``: a uniform random order (seeded; ``--mlm-seeds`` masks per image are averaged);
- ``checkerboard``: a fixed ordered-dither (Bayer) order, the checkerboard generalised to any keep ratio
  (at a keep ratio of 1/2 it is exactly a checkerboard; any prefix is spread evenly over the grid).

The two baselines ignore key regions (they are uniform by construction). Every stream is decoded by the
same decoder at realism 0 with the default fill, and measured over the whole image and inside the key
regions (``key_*``: the face / body-cascade boxes the map protects) and, on video frames, inside the
motion boxes of every pedestrian (``ped_*``).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .ablation_common import FIGURE_IMAGES, count_of, finite, fmt, masked_view, mean_of, table

METHODS = ("map", "map-no-anchors", "random", "checkerboard")


# ---- masks at equal bytes ---------------------------------------------------------------------------
def equal_bytes_stream(encoder, frame_shape: tuple[int, int], tokens: np.ndarray, priority: np.ndarray,
                       target_bytes: int, key_mask: np.ndarray | None = None, config=None):
    """(keep mask, stream) with the most tokens, in ``priority`` order, whose packed stream fits the budget.

    Raises ValueError when not even the empty stream fits."""
    from mridc.edge import mlm
    from mridc.edge.masking import MapGuidedSelection

    policy = MapGuidedSelection(config or mlm.MaskingConfig(anchor_spacing=0, protect_key_regions=False))
    keep, stream, _info = encoder.rate.fit(frame_shape, tokens, policy.order(priority, key_mask), target_bytes)
    return keep, stream


def random_priority(grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return rng.random(grid).astype(np.float32)


def checkerboard_priority(grid: tuple[int, int]) -> np.ndarray:
    """All ties: the selection falls back to its ordered-dither rank, a fixed checkerboard-like order."""
    return np.zeros(grid, np.float32)


# ---- the run -----------------------------------------------------------------------------------------
def run(ctx) -> dict:
    from mridc.edge import mlm

    args = ctx.args
    bpps = [float(b) for b in args.mlm_bpp.split(",") if b.strip()]
    seeds = max(1, int(args.mlm_seeds))
    settings = {"realism": 0.0, "fill": args.mlm_fill, "seed": args.seed}
    records: list[dict] = []
    figure_data: dict = {}
    stride = ctx.encoder().stride
    for index, item in enumerate(ctx.images, 1):
        t_image = time.perf_counter()
        h, w = item.image.shape[:2]
        short = item.name.split("/")[-1]
        for bpp in bpps:
            target = mlm.target_bytes_for_bpp(bpp, w, h)
            base = {"image": item.name, "set": item.set, "target_bpp": bpp, "target_bytes": target}
            streams: dict[str, list[tuple[np.ndarray, bytes]]] = {}
            try:
                res = ctx.encoder().encode(item.image, bpp=bpp, rois=item.rois)
            except ValueError as exc:  # budget below the smallest stream: no method fits
                for method in METHODS:
                    records.append({**base, "method": method, "status": "no_fit", "reason": str(exc)})
                continue
            tokens, key_mask = res.tokens, res.key_mask
            streams["map"] = [(res.token_frame.keep_mask, res.bitstream)]
            r0 = ctx.encoder(anchor_spacing=0).encode(item.image, bpp=bpp, rois=item.rois)
            streams["map-no-anchors"] = [(r0.token_frame.keep_mask, r0.bitstream)]
            streams["random"] = []
            for s in range(seeds):
                rng = np.random.default_rng([args.seed, s, index])
                streams["random"].append(equal_bytes_stream(ctx.encoder(), (h, w), tokens,
                                                            random_priority(tokens.shape, rng), target))
            streams["checkerboard"] = [equal_bytes_stream(ctx.encoder(), (h, w), tokens,
                                                          checkerboard_priority(tokens.shape), target)]
            for method in METHODS:
                runs = []
                for keep, stream in streams[method]:
                    if len(stream) > target:
                        raise AssertionError(f"{method} stream {len(stream)} B over budget {target} B")
                    t0 = time.perf_counter()
                    decoded, _ = ctx.decode(stream, **settings)
                    decode_s = time.perf_counter() - t0
                    m = ctx.meter.measure_image(item, decoded)
                    n_key = int(key_mask.sum())
                    m.update(bytes=len(stream), bpp=len(stream) * 8 / (w * h), keep_ratio=float(keep.mean()),
                             kept=int(keep.sum()), key_tokens=n_key,
                             key_kept_share=float(keep[key_mask].mean()) if n_key else None, decode_s=decode_s)
                    runs.append(m)
                    if short in FIGURE_IMAGES and item.redistributable and math.isclose(bpp, args.figure_bpp):
                        figure_data.setdefault(item.name, {"image": item.image, "priority": res.priority,
                                                           "key_boxes": item.key_boxes})
                        figure_data[item.name].setdefault(method, (keep, decoded, m))
                rec = {**base, "method": method, "status": "ok", "masks": len(runs)}
                for key in runs[0]:
                    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                    rec[key] = float(np.mean(values)) if values else None
                records.append(rec)
        print(f"  mlm [{index}/{len(ctx.images)}] {item.name} {w}x{h} {time.perf_counter() - t_image:.0f}s",
              file=sys.stderr)
    result = {
        "settings": {"bpp": bpps, "methods": list(METHODS), "random_masks_per_point": seeds,
                     "decode": settings, "masking_default": ctx.encoder().priority.config.to_dict()},
        "records": finite(records),
    }
    result["summary"] = summarise(records)
    result["wins"] = wins(records)
    if not args.no_figures and figure_data:
        try:
            result["figures"] = [str(p.relative_to(ctx.out)) for p in figure(figure_data, stride, ctx.out)]
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the numbers
            result["figure_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  mlm figure failed: {result['figure_error']}", file=sys.stderr)
    return result


# ---- summaries ---------------------------------------------------------------------------------------
SUMMARY_KEYS = ("bpp", "keep_ratio", "psnr", "ms_ssim", "perceptual", "key_psnr", "key_ms_ssim", "key_kept_share",
                "ped_psnr", "ped_ms_ssim", "decode_s")


def summarise(records: list[dict]) -> list[dict]:
    out = []
    sets = sorted({r["set"] for r in records})
    for bpp in sorted({r["target_bpp"] for r in records}):
        for group in ["all", *sets]:
            for method in METHODS:
                rows = [r for r in records if r["target_bpp"] == bpp and r["method"] == method
                        and (group == "all" or r["set"] == group)]
                ok = [r for r in rows if r.get("status") == "ok"]
                if not rows:
                    continue
                row = {"target_bpp": bpp, "set": group, "method": method, "n": len(rows), "n_ok": len(ok)}
                for key in SUMMARY_KEYS:
                    row[key] = mean_of(ok, key)
                row["n_key"] = count_of(ok, "key_psnr")
                row["n_ped"] = count_of(ok, "ped_psnr")
                out.append(row)
    return out


def wins(records: list[dict], reference: str = "map") -> list[dict]:
    """Per rate and rival: on how many images the reference method is better, paired over images."""
    out = []
    for bpp in sorted({r["target_bpp"] for r in records}):
        ref = {r["image"]: r for r in records if r["target_bpp"] == bpp and r["method"] == reference
               and r.get("status") == "ok"}
        for rival in METHODS:
            if rival == reference:
                continue
            other = {r["image"]: r for r in records if r["target_bpp"] == bpp and r["method"] == rival
                     and r.get("status") == "ok"}
            common = sorted(set(ref) & set(other))
            row = {"target_bpp": bpp, "reference": reference, "rival": rival, "n": len(common)}
            for key, higher in (("psnr", True), ("ms_ssim", True), ("perceptual", False), ("key_psnr", True),
                                ("ped_psnr", True)):
                pairs = [(ref[i][key], other[i][key]) for i in common
                         if ref[i].get(key) is not None and other[i].get(key) is not None]
                row[f"{key}_wins"] = sum(1 for a, b in pairs if (a > b if higher else a < b))
                row[f"{key}_n"] = len(pairs)
                row[f"{key}_mean_delta"] = float(np.mean([a - b for a, b in pairs])) if pairs else None
            out.append(row)
    return out


def render_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["## MLM: masking policy at equal bytes (issue 5)\n",
             (f"Rates {', '.join(f'{b:g}' for b in s['bpp'])} bpp; every method rate-controlled to the same byte "
             f"budget with the same pack; decoded at realism {s['decode']['realism']:g}, fill "
             f"`{s['decode']['fill']}`; {s['random_masks_per_point']} random mask(s) per image and rate. "
             "Means over images. `key`: inside the face / body-cascade boxes the map protects; `ped`: inside "
             "the motion boxes of every pedestrian (vtest). Perceptual: lower is better.\n")]
    rows = []
    for r in result["summary"]:
        rows.append([f"{r['target_bpp']:g}", r["set"], r["method"], f"{r['n_ok']}/{r['n']}", fmt(r["bpp"], 4),
                     fmt(r["keep_ratio"], 3), fmt(r["psnr"]), fmt(r["ms_ssim"], 4), fmt(r["perceptual"], 4),
                     f"{fmt(r['key_psnr'])} ({r['n_key']})", fmt(r["key_ms_ssim"], 4), fmt(r["key_kept_share"], 2),
                     f"{fmt(r['ped_psnr'])} ({r['n_ped']})"])
    lines.append(table(["bpp", "set", "method", "n", "bpp (measured)", "keep", "PSNR", "MS-SSIM", "perceptual",
                        "key PSNR (n)", "key MS-SSIM", "key tokens kept", "ped PSNR (n)"], rows))
    lines.append("\n### Paired over images: where the map wins\n")
    lines.append("`wins/n`: images on which `map` is better than the rival (PSNR, MS-SSIM, key PSNR, ped PSNR: "
                 "higher; perceptual: lower); `delta`: mean of map minus rival.\n")
    rows = []
    for w in result["wins"]:
        cells = [f"{w['target_bpp']:g}", f"map vs {w['rival']}"]
        for key, digits in (("psnr", 2), ("ms_ssim", 4), ("perceptual", 4), ("key_psnr", 2), ("ped_psnr", 2)):
            cells.append(f"{w[f'{key}_wins']}/{w[f'{key}_n']} ({fmt(w[f'{key}_mean_delta'], digits)})"
                         if w[f"{key}_n"] else "-")
        rows.append(cells)
    lines.append(table(["bpp", "comparison", "PSNR wins (delta)", "MS-SSIM wins (delta)", "perceptual wins (delta)",
                        "key PSNR wins (delta)", "ped PSNR wins (delta)"], rows))
    if result.get("figures"):
        lines.append("\n" + "\n".join(f"![MLM figure]({p})" for p in result["figures"]))
    return "\n".join(lines) + "\n"


# ---- figure ------------------------------------------------------------------------------------------
def figure(data: dict, stride: int, out) -> list:
    """Per image: original (key boxes), priority map, the map's mask, and the map / random / checkerboard decodes."""
    from .plots import _pyplot

    plt = _pyplot()
    names = sorted(data)
    fig, axes = plt.subplots(len(names), 6, figsize=(2.7 * 6, 2.1 * len(names)), dpi=100, squeeze=False)
    for row, name in zip(axes, names):
        d = data[name]
        image = d["image"]
        panels = [(image, name.split("/")[-1] + (" + key boxes" if d["key_boxes"] else "")),
                  (d["priority"], "priority map")]
        if "map" in d:
            keep = d["map"][0]
            panels.append((masked_view(image, keep, stride), f"map mask (sent tokens), keep {keep.mean():.2f}"))
        for method in ("map", "random", "checkerboard"):
            if method in d:
                keep, decoded, m = d[method]
                panels.append((decoded, f"{method} (keep {keep.mean():.2f})\n{m['psnr']:.2f} dB, perc {_p(m)}"))
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img, cmap="magma" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=7)
        for ax in row:
            ax.axis("off")
        for b in d["key_boxes"]:
            row[0].add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="lime", lw=1))
    fig.tight_layout()
    path = out / "figures" / "mlm_masks.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [path]


def _p(m: dict) -> str:
    return "-" if m.get("perceptual") is None else f"{m['perceptual']:.3f}"
