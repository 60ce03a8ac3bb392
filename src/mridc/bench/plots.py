"""Rate-distortion plots from ``rd`` summaries: bpp (measured, per original pixel) against each metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

METRIC_LABELS = {
    "psnr": ("PSNR (dB, RGB)", True),
    "ms_ssim": ("MS-SSIM", True),
    "perceptual": ("perceptual distance", False),
    "lpips_alex": ("LPIPS-Alex v0.1", False),
    "lpips_vgg": ("LPIPS-VGG v0.1", False),
    "dists": ("DISTS", False),
    "niqe": ("NIQE (lower = more natural)", False),
    "roi_psnr": ("PSNR inside ROIs (dB)", True),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rd_plot(rows: Sequence[dict], metric: str, path: str | Path, title: str = "",
            metric_label: str | None = None, reference: float | None = None) -> Path | None:
    """One curve per codec. ``rows`` are summary rows: codec, target_bpp, bpp, n, n_fit, <metric>.

    A point averaged over fewer images than the set has (the codec could not fit the budget on some) is
    drawn hollow and labelled k/n, so a curve never hides that it was measured on an easier subset.
    """
    plt = _pyplot()
    label, higher_better = METRIC_LABELS.get(metric, (metric, True))
    label = metric_label or label
    by_codec: dict[str, list[dict]] = {}
    for row in rows:
        if row.get(metric) is not None and row.get("bpp") is not None:
            by_codec.setdefault(row["codec"], []).append(row)
    if not by_codec:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for codec, points in sorted(by_codec.items()):
        points.sort(key=lambda r: r["bpp"])
        xs, ys = [p["bpp"] for p in points], [p[metric] for p in points]
        (line,) = ax.plot(xs, ys, "-", label=codec, linewidth=1.5)
        for p in points:
            full = p["n_fit"] == p["n"]
            ax.plot(p["bpp"], p[metric], "o", color=line.get_color(),
                    markerfacecolor=line.get_color() if full else "white", markersize=5)
            if not full:
                ax.annotate(f'{p["n_fit"]}/{p["n"]}', (p["bpp"], p[metric]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=line.get_color())
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1, label="original images")
    ax.set_xlabel("bits per pixel (measured, per original pixel)")
    ax.set_ylabel(label + ("" if higher_better else "  (lower is better)") if metric != "niqe" else label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
