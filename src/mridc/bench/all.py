"""``mridc-bench all``: the benchmark set that ``make bench`` runs, sized for ~30 minutes on 2 cores.

Steps, each into its own subfolder of ``--out`` (default ``docs/results``):

- ``rd``: rate-distortion-perception on 4 public eval photos at 0.02 / 0.03 / 0.05 bpp, MRIDC at realism
  0 and 0.5 (``mridc-bench rd``);
- ``edge``: encoder latency / RSS / size per backend, token agreement, tokenizer quality (``mridc-bench edge``);
- ``link``: capture-to-decoded time over 9.6 and 64 kbit/s links (``mridc-bench link``);
- ``ablation``: MLM and BPCG ablations on a few images (``mridc-bench ablation``, when it is importable);
- ``service``: the cloud service under a small simulated fleet (``bench/service_load.run_service_bench``).

A failing step is recorded and the next one runs. ``README.md`` in ``--out`` is the index this command writes
(command, machine, date, load, one line and links per step); it is rewritten after every step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

from mridc.lab.provenance import load_1min, machine

from .edge_bench import command_line

HELP = "everything `make bench` runs (rd, edge, link, ablation, service) in ~30 min; index in OUT/README.md"

STEP_NAMES = ("rd", "edge", "link", "ablation", "service")
STEP_ARGS = {
    "rd": ["--images", "photos-eval", "--limit", "4", "--bpp", "0.02,0.03,0.05", "--realism", "0,0.5",
           "--codecs", "mridc,jpeg,webp,avif,avif-obu,jxl", "--public-crops-only"],
    "edge": ["--repeats", "10", "--vtest-stride", "100"],
    "link": [],
    "ablation": ["--limit", "6", "--timing-repeats", "2"],
}
QUICK_ARGS = {  # --quick: a smoke run of the whole chain in a few minutes
    "rd": ["--images", "photos-eval", "--limit", "1", "--bpp", "0.02", "--realism", "0", "--codecs", "mridc,jpeg",
           "--metrics", "psnr,ms_ssim", "--crop-bpp", ""],
    "edge": ["--frames", "1", "--repeats", "2", "--eval-images", "photos-eval", "--eval-limit", "2",
             "--quality-codecs", "jpeg"],
    "link": ["--links", "64000", "--repeats", "1", "--burst", "2", "--burst-min-seconds", "1", "--codecs", "jpeg",
             "--max-bpp", "0.3"],
    "ablation": ["--limit", "1", "--timing-repeats", "0", "--no-figures"],
}
SERVICE = {"devices": 20, "interval_s": 3.0, "duration_s": 30.0, "workers": (1, 2), "modes": ("transport", "cheap"),
           "drain_timeout_s": 30.0}
SERVICE_QUICK = {"devices": 5, "interval_s": 2.0, "duration_s": 8.0, "workers": (1,), "modes": ("transport",),
                 "drain_timeout_s": 15.0}
DESCRIPTIONS = {
    "rd": "rate-distortion-perception: MRIDC vs JPEG/WebP/AVIF/JPEG XL",
    "edge": "edge encoder per backend (1 thread): latency, peak RSS, model size, token agreement, tokenizer quality",
    "link": "capture -> decoded at cloud over 9.6 / 64 kbit/s emulated links, frames per minute",
    "ablation": "MLM and BPCG ablations",
    "service": "cloud service load: simulated fleet through mosquitto to 1..N workers",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="docs/results", help="results folder (one subfolder per step)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the chain runs, numbers mean little")
    p.add_argument("--models-dir", default=None)


def _known_options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _filter_known(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Keep the options the subcommand's parser knows (with their values); return (kept, dropped)."""
    kept, dropped, i = [], [], 0
    while i < len(argv):
        opt = argv[i]
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        (kept if opt in known else dropped).extend(argv[i:j])
        i = j
    return kept, dropped


def run_subcommand(name: str, out: Path, extra: list[str], models_dir: str | None) -> dict:
    from .cli import load_builtin

    module = {"rd": "mridc.bench.rd", "edge": "mridc.bench.edge_bench", "link": "mridc.bench.link_bench",
              "ablation": "mridc.bench.ablation"}[name]
    sub = load_builtin(name, module)
    parser = argparse.ArgumentParser(prog=f"mridc-bench {name}")
    sub.add_arguments(parser)
    known = _known_options(parser)
    argv = list(extra) + ["--out", str(out)]
    if models_dir and "--models-dir" in known:
        argv += ["--models-dir", models_dir]
    argv, dropped = _filter_known(argv, known)
    args = parser.parse_args(argv)
    rc = int(sub.run(args) or 0)
    rec = {"status": "ok" if rc == 0 else "failed", "rc": rc, "argv": shlex.join(["mridc-bench", name, *argv])}
    if dropped:
        rec["dropped_options"] = dropped
    return rec


def run_service(out: Path, quick: bool, models_dir: str | None) -> dict:
    from .service_load import run_service_bench

    cfg = SERVICE_QUICK if quick else SERVICE
    result = run_service_bench(out, cfg["devices"], interval_s=cfg["interval_s"], duration_s=cfg["duration_s"],
                               workers=cfg["workers"], modes=cfg["modes"], drain_timeout_s=cfg["drain_timeout_s"],
                               models_dir=models_dir)
    call = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    return {"status": "ok", "argv": f"bench.service_load.run_service_bench(OUT, {call})",
            "summary_fps": result.get("summary_fps"), "skipped_modes": result.get("skipped")}


def _files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    wanted = {".json", ".md", ".png", ".html"}
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix in wanted and not p.name.endswith(".tmp"))


def write_index(out: Path, doc: dict) -> None:
    meta = doc["meta"]
    lines = ["# Benchmark results", "",
             (f"Written by `{meta['command']}` (what `make bench` runs). Each step writes into its own folder; "
             "this index is rewritten by the command."), "",
             f"- Date (UTC): {meta['date']}" + (f", finished {meta['finished']}" if meta.get("finished") else ""),
             f"- Machine: {meta['machine']}",
             (f"- 1-minute load average at start: {meta['load_1min_start']} (the machine is shared: timings are "
             "medians, with the load recorded next to each in the step's JSON)"),
             f"- Settings: {'--quick (smoke settings)' if meta['quick'] else 'default'}", "",
             "| step | what | status | minutes | load before / after | files |", "|---|---|---|---|---|---|"]
    for name, rec in doc["steps"].items():
        folder = out / name
        files = ", ".join(f"[{f}]({name}/{f})" for f in _files(folder)) or "-"
        status = rec.get("status", "?")
        if rec.get("reason") or rec.get("error"):
            status += f": {rec.get('reason') or rec.get('error')}"
        minutes = f"{rec['seconds'] / 60:.1f}" if rec.get("seconds") is not None else ""
        lines.append(f"| [{name}]({name}/) | {DESCRIPTIONS[name]} | {status} | {minutes} | "
                     f"{rec.get('load_before', '')} / {rec.get('load_after', '')} | {files} |")
    lines += ["", "Exact invocations:", ""]
    lines += [f"- {name}: `{rec['argv']}`" for name, rec in doc["steps"].items() if rec.get("argv")]
    lines += ["", ("Folders not listed above (e.g. `baselines/`) were written by other commands; see their own "
              "README files.")]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "all.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s] or list(STEP_NAMES)
    skip = {s for s in args.skip.split(",") if s}
    unknown = (set(only) | skip) - set(STEP_NAMES)
    if unknown:
        print(f"all: unknown steps {sorted(unknown)}; known: {', '.join(STEP_NAMES)}", file=sys.stderr)
        return 2
    steps = [s for s in STEP_NAMES if s in only and s not in skip]
    doc = {"meta": {"command": command_line(), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "machine": machine(), "load_1min_start": load_1min(), "quick": args.quick},
           "steps": {s: {"status": "pending"} for s in steps}}
    write_index(out, doc)
    failed = 0
    t_all = time.perf_counter()
    for name in steps:
        print(f"\n=== mridc-bench all: {name} -> {out / name} ===", file=sys.stderr, flush=True)
        rec = {"load_before": load_1min()}
        t0 = time.perf_counter()
        try:
            if name == "service":
                rec.update(run_service(out / name, args.quick, args.models_dir))
            else:
                extra = (QUICK_ARGS if args.quick else STEP_ARGS).get(name, [])
                rec.update(run_subcommand(name, out / name, extra, args.models_dir))
        except Exception as exc:  # noqa: BLE001 - one broken step must not cost the others
            rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["load_after"] = load_1min()
        failed += rec["status"] == "failed"
        doc["steps"][name] = rec
        write_index(out, doc)
        print(f"=== {name}: {rec['status']} in {rec['seconds'] / 60:.1f} min ===", file=sys.stderr, flush=True)
    doc["meta"]["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    doc["meta"]["minutes"] = round((time.perf_counter() - t_all) / 60, 1)
    write_index(out, doc)
    print(f"mridc-bench all: {len(steps) - failed}/{len(steps)} steps ok in {doc['meta']['minutes']} min; "
          f"index {out / 'README.md'}", file=sys.stderr)
    return 1 if failed else 0
