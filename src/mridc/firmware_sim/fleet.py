"""A fleet of simulated cameras: N edge agents in one process, one thread each.

Each simulated device has its own device id, its own durable queue file and its own transport
connection, and reads the same source (video file or image folder, looped). For load tests on
the cloud side, ``SyntheticEncoder`` makes real MRD streams at the requested bpp from random
tokens (seeded by the image) without loading any model.

>>> fleet = Fleet(devices=50, source="frames/", transport_url="mqtt://127.0.0.1:1883", workdir="/tmp/fleet")
>>> report = fleet.run(duration_s=60)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.edge.agent import EdgeAgent
from mridc.edge.capture import open_source
from mridc.edge.queue import FrameQueue
from mridc.edge.transport.base import Backoff, TlsFiles, open_transport
from mridc.shared.bitstream import TokenFrame, compress
from mridc.shared.entropy import TokenPrior

log = logging.getLogger("mridc.sim.fleet")

SYNTHETIC_MODEL_ID = 0x53594E54  # "SYNT": streams from SyntheticEncoder, not from a trained tokenizer
SYNTHETIC_STRIDE = 16
SYNTHETIC_CODEBOOK_BITS = 10


@dataclass
class SyntheticResult:
    bitstream: bytes
    bpp: float
    token_frame: TokenFrame
    timings: dict = field(default_factory=dict)


class SyntheticEncoder:
    """Same ``encode`` call as ``EdgeEncoder``; random tokens seeded by the image, real MRD bytes.

    ``delay_s`` emulates a slow device CPU (the time a Pi spends in the real encoder).
    """

    def __init__(self, *, model_id: int = SYNTHETIC_MODEL_ID, delay_s: float = 0.0,
                 prior: TokenPrior | None = None) -> None:
        self.model_id = model_id
        self.delay_s = delay_s
        self.prior = prior or TokenPrior.uniform(1 << SYNTHETIC_CODEBOOK_BITS)

    def encode(self, image: np.ndarray, bpp: float = 0.02, keep_ratio: float | None = None, rois=None,
               **_ignored) -> SyntheticResult:
        start = time.perf_counter()
        height, width = image.shape[:2]
        grid_h, grid_w = max(1, height // SYNTHETIC_STRIDE), max(1, width // SYNTHETIC_STRIDE)
        seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(image[::8, ::8]).tobytes()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        if keep_ratio is None:
            # ~11 bits per kept token (10 for the index, ~1 for the mask) after a small header.
            keep_ratio = (bpp * width * height - 200) / (11 * grid_h * grid_w)
        kept = int(np.clip(round(keep_ratio * grid_h * grid_w), 1, grid_h * grid_w))
        mask = np.zeros(grid_h * grid_w, dtype=bool)
        mask[rng.choice(grid_h * grid_w, size=kept, replace=False)] = True
        frame = TokenFrame(
            width=width, height=height, grid_h=grid_h, grid_w=grid_w, model_id=self.model_id,
            codebook_bits=SYNTHETIC_CODEBOOK_BITS, keep_mask=mask.reshape(grid_h, grid_w),
            kept_tokens=rng.integers(0, 1 << SYNTHETIC_CODEBOOK_BITS, kept).astype(np.uint16),
        )
        bitstream = compress(frame, self.prior)
        if self.delay_s:
            time.sleep(self.delay_s)
        return SyntheticResult(bitstream, len(bitstream) * 8 / (width * height), frame,
                               {"total_s": time.perf_counter() - start})


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

    def _agent(self, device_id: str) -> EdgeAgent:
        queue = FrameQueue(self.workdir / device_id / "queue.db", device_id, max_frames=self.queue_max_frames,
                           policy=self.queue_policy)
        transport = open_transport(self.transport_url, device_id, tls=self.tls, backoff=Backoff(0.5, 15.0),
                                   **self.credentials(device_id))
        source = open_source(self.source, fps=self.fps, size=self.size, loop=True, max_frames=self.max_frames)
        return EdgeAgent(device_id=device_id, encoder=self.encoder_factory(), transport=transport, queue=queue,
                         source=source, bpp=self.bpp, min_bpp=min(self.bpp, 0.005), ack_timeout_s=self.ack_timeout_s,
                         window=self.window, heartbeat_s=30.0)

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
