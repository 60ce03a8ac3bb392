"""``mridc-bench``: one entry point, one subcommand per benchmark.

A subcommand is a name, a help line, ``add_arguments(parser)`` and ``run(args) -> exit code``. There are
two ways to add one:

- write a module that defines ``HELP``, ``add_arguments`` and ``run``, and list it in ``BUILTIN_MODULES``
  (one line; the module may live next to its feature, e.g. ``mridc.edge.bench``);
- or call ``register(Subcommand(...))`` before ``main()`` runs (tests, plugins).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# name -> module path; the module defines HELP, add_arguments(parser), run(args) -> int.
BUILTIN_MODULES: dict[str, str] = {
    "rd": "mridc.bench.rd",
    "edge": "mridc.bench.edge_bench",
    "link": "mridc.bench.link_bench",
    "ablation": "mridc.bench.ablation",
    "service": "mridc.bench.service",
    "all": "mridc.bench.all",
    "models": "mridc.bench.model_eval",
    "compare": "mridc.bench.compare",
    "refine": "mridc.bench.refine_bench",
    "loss": "mridc.bench.loss_bench",
    "sequence": "mridc.bench.sequence_bench",
    "adapt": "mridc.bench.adapt_bench",
    "plot-log": "mridc.bench.plot_log",
}

SUBCOMMANDS: dict[str, Subcommand] = {}


def register(sub: Subcommand, replace: bool = False) -> Subcommand:
    if sub.name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {sub.name!r} is already registered")
    SUBCOMMANDS[sub.name] = sub
    return sub


def load_builtin(name: str, module: str) -> Subcommand:
    mod = importlib.import_module(module)
    return Subcommand(name, getattr(mod, "HELP", ""), mod.add_arguments, mod.run)


def subcommands() -> dict[str, Subcommand]:
    """Registered subcommands plus the built-in modules (a registered one wins over a built-in name)."""
    found = {name: load_builtin(name, module) for name, module in BUILTIN_MODULES.items()
             if name not in SUBCOMMANDS}
    return {**found, **SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mridc-bench", description="MRIDC Edge benchmarks; each writes JSON + plots.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in subcommands().items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
