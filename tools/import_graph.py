"""Draw the package-level import arrows of src/mridc as a layered picture (docs/architecture_imports.png).

The arrows are the ones `tests/test_import_rules.py` checks (every first-party import, including those inside
functions). Usage: .venv/bin/python tools/import_graph.py [--out docs/architecture_imports.png]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_import_rules as rules

# Layers from the bottom up: each package may import only packages on lower rows (or its own row's parent).
LAYERS = [
    ["mridc.v1", "mridc.shared"],
    ["mridc.edge", "mridc.edge.transport"],
    ["mridc.cloud", "mridc.cloud.diffusion", "mridc.cloud.service", "mridc.cloud.train"],
    ["mridc.lab"],
    ["mridc.bench", "mridc.firmware_sim", "mridc.firmware_sim.demo"],
]


def package_arrows() -> dict[tuple[str, str], int]:
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for src, dsts in rules.GRAPH.items():
        for dst in dsts:
            a, b = rules.package_of(src), rules.package_of(dst)
            if a != b:
                arrows[(a, b)] += 1
    return arrows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "architecture_imports.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {}
    for row, names in enumerate(LAYERS):
        for col, name in enumerate(names):
            pos[name] = ((col + 0.5) / len(names), row)
    arrows = package_arrows()
    unknown = sorted({n for pair in arrows for n in pair} - set(pos))
    if unknown:
        print(f"packages missing from LAYERS: {unknown}", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(11, 7))
    for (a, b), count in sorted(arrows.items()):
        (x0, y0), (x1, y1) = pos[a], pos[b]
        upward = y1 > y0
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                    arrowprops={"arrowstyle": "->", "color": "red" if upward else "0.45",
                                "lw": 0.6 + 0.25 * min(count, 8), "shrinkA": 4, "shrinkB": 4,
                                "connectionstyle": "arc3,rad=0.08"})
    for name, (x, y) in pos.items():
        ax.text(x, y, name.removeprefix("mridc."), ha="center", va="center", fontsize=10,
                bbox={"boxstyle": "round,pad=0.4", "fc": "#e8f0fe" if y < 2 else "#fef3e8" if y < 3 else "#eef8e8",
                          "ec": "0.3"})
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.5, 4.5)  # the base layers at the bottom, applications on top
    ax.axis("off")
    ax.set_title("mridc import arrows between packages (arrow = imports; width ~ number of module imports;"
                 " red = points up a layer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"{len(arrows)} package arrows, {sum(1 for (a, b) in arrows if pos[b][1] > pos[a][1])} upward -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
