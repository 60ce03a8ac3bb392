"""A fleet of simulated cameras: N edge agents in one process, one thread each.

Each simulated device has its own device id, its own durable queue file and its own transport
connection, and reads the same source (video file or image folder, looped). Each agent is wired by
``mridc.edge.agent.build_agent`` from a device config, as ``mridc-edge run`` wires a real camera. By
default the devices encode with ``mridc.lab.synthetic.SyntheticEncoder`` (real MRD streams, no model).

>>> fleet = Fleet(devices=50, source="frames/", transport_url="mqtt://127.0.0.1:1883", workdir="/tmp/fleet")
>>> report = fleet.run(duration_s=60)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mridc.edge.agent import EdgeAgent, build_agent
from mridc.edge.config import DeviceConfig
from mridc.edge.transport.base import TlsFiles

from .synthetic import SyntheticEncoder

log = logging.getLogger("mridc.sim.fleet")


class Fleet:
    """N simulated devices ``{prefix}{i:04d}`` (i = 1..N), each an ``EdgeAgent`` in its own thread."""

    def __init__(
        self,
        *,
        devices: int,
        source: str,
        transport_url: str,
        workdir: str | Path,
        prefix: str = "sim-",
        fps: float = 0.2,
        bpp: float = 0.02,
        size: tuple[int, int] | None = None,
        encoder_factory: Callable[[], object] | None = None,
        max_frames: int | None = None,
        start_spread_s: float = 1.0,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        credentials: Callable[[str], dict] | None = None,
        ack_timeout_s: float = 30.0,
        window: int = 4,
        queue_max_frames: int = 1000,
        queue_policy: str = "drop_oldest",
    ) -> None:
        if devices < 1:
            raise ValueError("a fleet needs at least one device")
        self.device_ids = [f"{prefix}{i:04d}" for i in range(1, devices + 1)]
        self.source, self.transport_url = source, transport_url
        self.workdir = Path(workdir)
        self.fps, self.bpp, self.size, self.max_frames = fps, bpp, size, max_frames
        self.encoder_factory = encoder_factory or SyntheticEncoder
        self.start_spread_s = start_spread_s
        self.credentials = credentials or (lambda device_id: {"username": username, "password": password,
                                                              "token": token})
        self.tls = tls
        self.ack_timeout_s, self.window = ack_timeout_s, window
        self.queue_max_frames, self.queue_policy = queue_max_frames, queue_policy
        self.agents: dict[str, EdgeAgent] = {}
        self.results: dict[str, dict] = {}
        self._stop = threading.Event()

    def device_config(self, device_id: str) -> DeviceConfig:
        """The config a real camera in this fleet would run with (looped source, fast reconnects)."""
        config = DeviceConfig()
        config.device.id = device_id
        config.source.uri, config.source.fps, config.source.loop = self.source, self.fps, True
        if self.size:
            config.source.width, config.source.height = self.size
        t = config.transport
        t.url = self.transport_url
        credentials = self.credentials(device_id)
        t.username = credentials.get("username") or ""
        t.password = credentials.get("password") or ""
        t.token = credentials.get("token") or ""
        if self.tls is not None:
            t.ca_file, t.cert_file, t.key_file = (self.tls.ca_file or "", self.tls.cert_file or "",
                                                  self.tls.key_file or "")
        t.backoff_initial_s, t.backoff_max_s = 0.5, 15.0
        t.ack_timeout_s, t.window = self.ack_timeout_s, self.window
        config.queue.path = str(self.workdir / device_id / "queue.db")
        config.queue.max_frames, config.queue.policy = self.queue_max_frames, self.queue_policy
        config.encoder.bpp, config.encoder.min_bpp = self.bpp, min(self.bpp, 0.005)
        config.status.heartbeat_s = 30.0
        return config.validate()

    def _agent(self, device_id: str) -> EdgeAgent:
        return build_agent(self.device_config(device_id), self.encoder_factory(), max_frames=self.max_frames)

    def _run_one(self, device_id: str, delay: float, drain_timeout_s: float) -> None:
        if self._stop.wait(delay):
            return
        agent = self.agents[device_id]
        try:
            self.results[device_id] = agent.run(self._stop, drain_timeout_s=drain_timeout_s)
        except Exception as exc:
            log.exception("%s: agent failed", device_id)
            self.results[device_id] = {"error": str(exc)}
        finally:
            agent.queue.close()

    def run(self, duration_s: float | None = None, drain_timeout_s: float = 10.0) -> dict:
        """Run every device until its source ends (``max_frames``) or ``duration_s`` passes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.agents = {device_id: self._agent(device_id) for device_id in self.device_ids}
        spread = self.start_spread_s / max(1, len(self.device_ids))
        threads = [
            threading.Thread(target=self._run_one, args=(device_id, i * spread, drain_timeout_s),
                             name=f"fleet-{device_id}", daemon=True)
            for i, device_id in enumerate(self.device_ids)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = None if duration_s is None else started + duration_s
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
                if deadline is not None and time.monotonic() > deadline:
                    self._stop.set()
        return self.report(time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()

    def report(self, elapsed_s: float) -> dict:
        totals = {"captured": 0, "accepted": 0, "acked": 0, "queued": 0, "dropped": 0}
        for status in self.results.values():
            if "agent" not in status:
                continue
            totals["captured"] += status["agent"]["captured"]
            totals["accepted"] += status["agent"]["accepted"]
            totals["acked"] += status["forwarder"]["acked"]
            totals["queued"] += status["queue"]["depth"]
            totals["dropped"] += status["queue"]["dropped_oldest"] + status["queue"]["dropped_newest"]
        return {"devices": len(self.device_ids), "elapsed_s": round(elapsed_s, 2),
                "errors": sum(1 for s in self.results.values() if "error" in s), **totals,
                "per_device": self.results}
