"""`mridc-bench service`: the ingest load benchmark (bench/service_load.py) as a subcommand.

M simulated devices send through a real mosquitto to 1..N real service workers; frames/s per worker, CPU,
memory and backlog over time, for the transport-only path, the cheap decode (tokenizer, realism 0) and full BPCG.
"""

from __future__ import annotations

import argparse
import json

HELP = "cloud service load: M devices through mosquitto to 1..N workers (JSON + plot)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="docs/results/service", help="output folder")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between frames per device")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending per configuration")
    p.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    p.add_argument("--modes", default="transport,cheap,full", help="transport (no decode), cheap (realism 0), full")
    p.add_argument("--models", help="models folder")


def run(args: argparse.Namespace) -> int:
    from mridc.bench.service_load import run_service_bench

    result = run_service_bench(args.out, args.devices, interval_s=args.interval, duration_s=args.duration,
                               workers=tuple(int(w) for w in args.workers.split(",") if w),
                               modes=tuple(m for m in args.modes.split(",") if m), models_dir=args.models)
    print(json.dumps(result.get("summary", {k: v for k, v in result.items() if k != "runs"}), indent=2,
                     default=str)[:4000])
    return 0
