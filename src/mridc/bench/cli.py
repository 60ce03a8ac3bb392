"""``mridc-bench``: one entry point, one subcommand per benchmark.

A subcommand is a name, a help line, ``add_arguments(parser)`` and ``run(args) -> exit code``. There are
two ways to add one:

- write a module that defines ``HELP``, ``add_arguments`` and ``run``, and list it in ``BUILTIN_MODULES``
  (one line; the module may live next to its feature, e.g. ``mridc.edge.bench``);
- or call ``register(Subcommand(...))`` before ``main()`` runs (tests, plugins).

A listed module that does not exist yet gets a stub that says so and exits with status 2. It never prints
numbers.
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
    "plot-log": "mridc.bench.plot_log",
}

SUBCOMMANDS: dict[str, Subcommand] = {}


def register(sub: Subcommand, replace: bool = False) -> Subcommand:
    if sub.name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {sub.name!r} is already registered")
    SUBCOMMANDS[sub.name] = sub
    return sub


def _unavailable(name: str, module: str, why: str) -> Subcommand:
    def run(_args: argparse.Namespace) -> int:
        print(f"mridc-bench {name}: not available yet ({why})", file=sys.stderr)
        return 2

    return Subcommand(name, f"(not available yet: {module})", lambda _p: None, run)


def load_builtin(name: str, module: str) -> Subcommand:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return _unavailable(name, module, f"module {module} is not written yet")
        raise
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
