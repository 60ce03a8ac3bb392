"""`mridc-bench plot-log`: plot a trainer's log.jsonl (losses over steps, eval metrics) to PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "plot a training log (log.jsonl) to PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", help="log.jsonl files written by mridc-cloud train")
    p.add_argument("--out", default="docs/results/models", help="output folder")


def plot_log(path: Path, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    keys = [k for k in (train[0] if train else {}) if k not in ("step", "elapsed", "lr", "restarted")]
    eval_keys = list(evals[0]["eval"]) if evals else []
    n = len(keys) + len(eval_keys)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.2 * max(n, 1), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1)
        ax.set_title(key, fontsize=9)
    for ax, key in zip(axes[0][len(keys):], eval_keys):
        ax.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", ms=3, color="tab:red")
        ax.set_title(f"eval {key}", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    name = path.parent.name if path.name == "log.jsonl" else path.stem
    fig.suptitle(f"training log: {name}", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"training_{name}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    for log in args.logs:
        print(plot_log(Path(log), Path(args.out)))
    return 0
