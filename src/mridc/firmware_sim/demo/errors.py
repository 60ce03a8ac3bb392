"""How the demo fails: exit status 1 for a failed run, 2 for a missing piece."""

from __future__ import annotations


class DemoError(RuntimeError):
    """The demo ran but something failed: a frame was lost or rejected, a process died, a timeout."""

    exit_code = 1


class MissingPiece(DemoError):
    """Something the demo needs is not on this machine; the message says what and how to get it."""

    exit_code = 2
