"""A real mosquitto 2 broker on a free loopback port, for tests and local experiments.

>>> with MosquittoBroker() as broker:
...     client.connect("127.0.0.1", broker.port)

The config is generated into a temporary directory (removed on ``stop``). TLS, a password file, an
ACL file and persistence are options. ``restart()`` keeps the port and the persistence store, so a
test can kill the broker mid-stream and bring it back.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

log = logging.getLogger("mridc.sim.broker")


class BrokerError(RuntimeError):
    """mosquitto is missing, or did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a BrokerError that says how to install it."""
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise BrokerError(
            "mosquitto not found on PATH or in /usr/sbin: install the Debian package 'mosquitto' "
            "(apt-get install mosquitto; it is only needed for tests and local brokers)"
        )
    return path


def write_password_file(path: str | os.PathLike, users: dict[str, str]) -> Path:
    """Write a mosquitto password file (hashed with ``mosquitto_passwd``) for ``{user: password}``."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise BrokerError("mosquitto_passwd not found: it ships with the Debian package 'mosquitto'")
    path = Path(path)
    path.write_text("")
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class BrokerTls:
    """Server-side TLS files for a listener; ``require_certificate`` turns on client-certificate auth."""

    cafile: str
    certfile: str
    keyfile: str
    require_certificate: bool = False
    use_identity_as_username: bool = False


class MosquittoBroker:
    """Start/stop a mosquitto process with a generated config. Use as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        tls: BrokerTls | None = None,
        password_file: str | os.PathLike | None = None,
        acl_file: str | os.PathLike | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = False,
        extra_config: list[str] | tuple[str, ...] = (),
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = find_mosquitto()
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.password_file = password_file
        self.acl_file = acl_file
        # Without credentials configured, anonymous clients are the only kind there can be.
        self.allow_anonymous = (password_file is None and tls is None) if allow_anonymous is None else allow_anonymous
        self.persistence = persistence
        self.extra_config = list(extra_config)
        self.start_timeout = start_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="mridc-mosquitto-"))
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "set_tcp_nodelay true",
            # stdout goes to our log file; no syslog, no pid file.
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            # mosquitto drops root privileges to user 'mosquitto', who cannot read our temp dir.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.tls:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
            if self.tls.use_identity_as_username:
                lines.append("use_identity_as_username true")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "persistence_file mosquitto.db",
                "autosave_interval 1",
            ]
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        self.config_path.write_text(self.config_text())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("mosquitto %s listening on %s (pid %d)", self.url, self.port, self._proc.pid)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {self.start_timeout} s")

    def stop(self, *, kill: bool = False, cleanup: bool = True) -> None:
        """Stop the broker (SIGTERM, which saves persistence; ``kill=True`` sends SIGKILL)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if cleanup:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, down_for: float = 0.0, *, kill: bool = False) -> None:
        """Stop and start again on the same port with the same persistence store."""
        self.stop(kill=kill, cleanup=False)
        if down_for:
            time.sleep(down_for)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
