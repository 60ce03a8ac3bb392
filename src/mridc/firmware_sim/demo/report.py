"""The report: report.json (written by the run), report.md, index.html and the console summary."""

from __future__ import annotations

import html
from pathlib import Path


# -- reports --------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("mridc")]
    with_avif = [r for r in ok if r.get("avif") and "error" not in r["avif"]]
    summary = {
        "frames": len(rows),
        "bytes_total": sum(r["bytes"] for r in rows),
        "bpp_mean": _mean(r["bpp"] for r in rows),
        "capture_to_stored_s_mean": _mean(r["capture_to_stored_s"] for r in rows),
        "capture_to_stored_s_max": max((r["capture_to_stored_s"] for r in rows if r["capture_to_stored_s"]),
                                       default=None),
        "mridc": {k: _mean(r["mridc"].get(k) for r in ok) for k in ("psnr", "ms_ssim", "perceptual", "lpips_alex")},
        "avif": {k: _mean(r["avif"].get(k) for r in with_avif)
                 for k in ("psnr", "ms_ssim", "perceptual", "lpips_alex")},
        "avif_frames": len(with_avif),
    }
    if with_avif:  # on the frames where both exist: who is better, frame by frame
        wins = {}
        for key, higher_better in (("psnr", True), ("ms_ssim", True), ("perceptual", False), ("lpips_alex", False)):
            pairs = [(r["mridc"].get(key), r["avif"].get(key)) for r in with_avif]
            pairs = [(m, a) for m, a in pairs if m is not None and a is not None]
            if pairs:
                wins[key] = sum(1 for m, a in pairs if (m > a if higher_better else m < a))
        summary["mridc_better_than_avif"] = wins
    return summary


def _table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        m, a = r.get("mridc") or {}, r.get("avif") or {}
        avif_cells = ([fmt(a.get("psnr")), fmt(a.get("ms_ssim"), ".3f"), fmt(a.get("perceptual"), ".3f"),
                       str(a.get("bytes", "")), f"1/{a['downscale']:g}, q{a['quality']}"]
                      if a and "error" not in a else ["no fit"] * 3 + ["-", "-"])
        out.append([r["device"], str(r["sequence"]), r["source"], f"{r['width']}x{r['height']}", str(r["bytes"]),
                    f"{r['bpp']:.4f}", fmt(r["capture_to_stored_s"], ".1f"), fmt(m.get("psnr")),
                    fmt(m.get("ms_ssim"), ".3f"), fmt(m.get("perceptual"), ".3f"), *avif_cells])
    return out


_HEADERS = ["device", "seq", "source", "size", "bytes", "bpp", "capture→stored s", "MRIDC PSNR", "MRIDC MS-SSIM",
            "MRIDC perc.", "AVIF PSNR", "AVIF MS-SSIM", "AVIF perc.", "AVIF bytes", "AVIF setting"]


def write_markdown(report: dict, path: Path) -> None:
    s, setup = report["summary"], report["setup"]
    d = report["delivery"]
    lines = [
        "# MRIDC Edge demo report", "",
        f"{report['created']}, {setup['machine']}. Command: `{report['command']}`", "",
        (f"{len(setup['cameras'])} cameras -> {setup['link']['description']} link each -> {setup['transport']} "
         f"-> cloud service (realism {setup['realism']}, seed {setup['seed']}). Target {setup['bpp']} bpp."), "",
        (f"Delivery: {d['stored']}/{d['accepted']} accepted frames stored, each exactly once: {d['exactly_once']}. "
         f"Frames resent: {d['resent']}, duplicate acks: {d['duplicate_acks']}, rejected: {d['rejected']}."), "",
        "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _table_rows(report["frames"])]
    m, a = s["mridc"], s["avif"]
    lines += [
        "", "## Means", "",
        ("| | PSNR dB (higher better) | MS-SSIM (higher better) | perceptual (lower better) "
         "| LPIPS-Alex v0.1 (lower better) |"), "|---|---|---|---|---|",
        (f"| MRIDC | {fmt(m['psnr'])} | {fmt(m['ms_ssim'], '.3f')} | {fmt(m['perceptual'], '.3f')} "
         f"| {fmt(m.get('lpips_alex'), '.3f')} |"),
        (f"| AVIF, same bytes ({s['avif_frames']} frames) | {fmt(a['psnr'])} | {fmt(a['ms_ssim'], '.3f')} | "
         f"{fmt(a['perceptual'], '.3f')} | {fmt(a.get('lpips_alex'), '.3f')} |"), "",
        "MRIDC better than AVIF at the same bytes, frames: " + (", ".join(
            f"{k} {v}/{s['avif_frames']}" for k, v in s.get("mridc_better_than_avif", {}).items()) or "n/a") + ".", "",
        "## Notes", "",
        f"- Perceptual distance: {setup['perceptual']}.",
        (f"- AVIF: {setup['avif']}; best PSNR over quality and downscale factor (lab/codecs.py) with at most "
         "the MRIDC frame's bytes. Neither side counts the MQTT/protobuf envelope; the links carried "
         f"{report['link']['bytes_up']} bytes up in all (protocol included)."),
        ("- capture→stored: camera capture time to the cloud's PNG + sidecar on disk (encode, queue, link, "
         "broker, decode queue, decode, store); frames wait for each other in the cloud's decode queue."),
        "- Quality is measured against the frame the camera captured (the clip's frames are MJPG-decoded).",
        ("- Files: `side_by_side/` (original | MRIDC | AVIF), `cloud/frames/` (reconstructions + sidecars), "
         "`originals/`, `bitstreams/`, `avif/`, `logs/`."),
    ]
    path.write_text("\n".join(lines) + "\n")


def write_html(report: dict, path: Path) -> None:
    s = report["summary"]
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                   for cells in _table_rows(report["frames"]))
    figures = "".join(
        f'<figure><img src="{esc(r["side_by_side"])}" alt="{esc(r["name"])}"><figcaption>{esc(r["device"])} '
        f'#{r["sequence"]} ({esc(r["source"])}): original | MRIDC {r["bytes"]} B | AVIF at the same bytes'
        f"</figcaption></figure>" for r in report["frames"] if r.get("side_by_side"))
    d = report["delivery"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MRIDC Edge demo</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body>
<h1>MRIDC Edge demo</h1>
<p>{esc(report['created'])}. {len(report['setup']['cameras'])} cameras, {esc(report['setup']['link']['description'])}
link, {esc(report['setup']['transport'])}, realism {report['setup']['realism']}, \
target {report['setup']['bpp']} bpp.</p>
<p>Delivered: {d['stored']}/{d['accepted']} stored, exactly once: {d['exactly_once']}; resent {d['resent']},
duplicate acks {d['duplicate_acks']}, rejected {d['rejected']}.
Mean capture&rarr;stored {fmt(s['capture_to_stored_s_mean'], '.1f')} s.</p>
<p>Means: MRIDC PSNR {fmt(s['mridc']['psnr'])} dB, MS-SSIM {fmt(s['mridc']['ms_ssim'], '.3f')}, perceptual
{fmt(s['mridc']['perceptual'], '.3f')}; AVIF at the same bytes PSNR {fmt(s['avif']['psnr'])} dB, MS-SSIM
{fmt(s['avif']['ms_ssim'], '.3f')}, perceptual {fmt(s['avif']['perceptual'], '.3f')}.
Perceptual: {esc(report['setup']['perceptual'])} (lower is closer).</p>
<table><tr>{head}</tr>{body}</table>
{figures}
</body></html>
"""
    path.write_text(page)


def print_summary(report: dict) -> None:
    s, d, setup = report["summary"], report["delivery"], report["setup"]
    print()
    print(f"MRIDC Edge demo: {d['accepted']} frames from {len(setup['cameras'])} cameras over "
          f"{setup['link']['description']} ({setup['transport']}), realism {setup['realism']}, "
          f"target {setup['bpp']} bpp")
    cols = ["device", "seq", "source", "bytes", "bpp", "deliv s", "PSNR", "MS-SSIM", "perc", "| AVIF", "MS-SSIM",
            "perc"]
    widths = [10, 3, 22, 5, 6, 7, 6, 7, 6, 6, 7, 6]
    print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))))
    for r in report["frames"]:
        m, a = r.get("mridc") or {}, r.get("avif") or {}
        has_avif = a and "error" not in a
        cells = [r["device"], str(r["sequence"]), r["source"][-22:], str(r["bytes"]), f"{r['bpp']:.4f}",
                 fmt(r["capture_to_stored_s"], ".1f"), fmt(m.get("psnr")), fmt(m.get("ms_ssim"), ".3f"),
                 fmt(m.get("perceptual"), ".3f"),
                 "| " + (fmt(a.get("psnr")) if has_avif else "no fit"),
                 fmt(a.get("ms_ssim"), ".3f") if has_avif else "-",
                 fmt(a.get("perceptual"), ".3f") if has_avif else "-"]
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    print(f"mean: MRIDC PSNR {fmt(s['mridc']['psnr'])} dB, MS-SSIM {fmt(s['mridc']['ms_ssim'], '.3f')}, perceptual "
          f"{fmt(s['mridc']['perceptual'], '.3f')} | AVIF at the same bytes PSNR {fmt(s['avif']['psnr'])} dB, "
          f"MS-SSIM {fmt(s['avif']['ms_ssim'], '.3f')}, perceptual {fmt(s['avif']['perceptual'], '.3f')}")
    if "mridc_better_than_avif" in s:
        wins = ", ".join(f"{k} {v}/{s['avif_frames']}" for k, v in s["mridc_better_than_avif"].items())
        print(f"MRIDC better than AVIF (frames): {wins}")
    print(f"delivery: {d['stored']}/{d['accepted']} stored, exactly once: {d['exactly_once']}, resent {d['resent']}, "
          f"duplicate acks {d['duplicate_acks']}, rejected {d['rejected']}; capture->stored mean "
          f"{fmt(s['capture_to_stored_s_mean'], '.1f')} s, max {fmt(s['capture_to_stored_s_max'], '.1f')} s; "
          f"{s['bytes_total']} MRD bytes, {report['link']['bytes_up']} bytes up the links")
    print(f"perceptual: {setup['perceptual']}")
    print(f"report: {report['out']}/report.md, {report['out']}/index.html; side by side: {report['out']}/side_by_side/")
    print(f"took {report['elapsed_s']:.0f} s")
