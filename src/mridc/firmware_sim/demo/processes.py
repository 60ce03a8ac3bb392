"""The processes the demo starts, each in its own process group so that it can always be stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import DemoError


class CloudService:
    """``mridc-cloud serve`` (``python -m mridc.cloud.cli serve``) in its own process group."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.command = [sys.executable, "-m", "mridc.cloud.cli", "serve", *args]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.ready: dict | None = None
        self._ready_event = threading.Event()
        threading.Thread(target=self._read_stdout, name="cloud-stdout", daemon=True).start()

    def wait_ready(self, ready_timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready_event.wait(0.2):
            if self.proc.poll() is not None:
                raise DemoError(f"the cloud service exited with status {self.proc.returncode} before it was ready:\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"the cloud service was not ready after {ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("event") == "ready":
                self.ready = data
                self._ready_event.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        _stop_group(self.proc, timeout_s=30.0)
        if not self._log.closed:
            self._log.close()


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the process group this demo created for ``proc`` (its PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # The group may outlive its leader (a worker's children): make sure nothing of it is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
