"""Command-line conventions shared by every `mridc-*` tool: exit 0 on success, 2 on invalid input or
arguments (one line on stderr, no traceback), 1 on internal errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID = 0, 1, 2


class InvalidInput(Exception):
    """Raised by commands for bad user input; printed as one line, exit status 2."""


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str,
                invalid: tuple[type[BaseException], ...] = ()) -> int:
    from mridc.shared.bitstream import BitstreamError

    try:
        return func(args)
    except (InvalidInput, BitstreamError, ValueError, FileNotFoundError, IsADirectoryError, *invalid) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        logging.getLogger(prog).debug("internal error", exc_info=True)
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (run with MRIDC_DEBUG=1 for a traceback)",
              file=sys.stderr)
        if _debug():
            raise
        return EXIT_INTERNAL


def _debug() -> bool:
    import os

    return os.environ.get("MRIDC_DEBUG", "") not in ("", "0")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass
