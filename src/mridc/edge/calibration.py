"""Calibration stills for scene adaptation: when the agent takes them and how it codes them.

A fixed camera sends a few high-quality stills of its scene now and then (at start-up, every
`interval_s`, and when the cloud asks in an ack), so that the cloud can adapt its decoder to the scene
(docs/adaptation.md). A round is `frames` stills, taken `every_frames` live frames apart so that they show
the scene at different moments. Each still is a JPEG of at most `max_bytes`; it goes into the durable queue
at a lower priority than live frames.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np

from mridc.edge.config import MIN_STILL_QUALITY, CalibrationSection

STARTUP, SCHEDULE, REQUEST = "startup", "schedule", "request"


class CalibrationScheduler:
    """Decides, once per live frame, whether that frame is also sent as a calibration still (`due`)."""

    def __init__(self, config: CalibrationSection, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._reason: str | None = STARTUP if config.enabled and config.at_startup else None
        self._left = config.frames if self._reason else 0
        self._gap = 0
        self._next_round = clock() + config.interval_s if config.interval_s else float("inf")

    def request(self) -> None:
        """The cloud asked for stills: start a round unless one is under way."""
        if self.config.enabled and not self._left:
            self._reason, self._left, self._gap = REQUEST, self.config.frames, 0

    def due(self) -> str | None:
        """The reason (startup, schedule, request) to send this live frame as a still too, or None."""
        if not self.config.enabled:
            return None
        if not self._left and self.clock() >= self._next_round:
            self._reason, self._left, self._gap = SCHEDULE, self.config.frames, 0
        if not self._left:
            return None
        if self._gap > 0:
            self._gap -= 1
            return None
        self._left -= 1
        self._gap = self.config.every_frames - 1
        if not self._left and self.config.interval_s:
            self._next_round = self.clock() + self.config.interval_s
        return self._reason


def encode_still(image: np.ndarray, max_bytes: int, quality: int = 90) -> tuple[bytes, int, int]:
    """A JPEG of an RGB frame within `max_bytes`: lower quality first, then smaller. -> (file, width, height)."""
    from PIL import Image

    still = Image.fromarray(np.ascontiguousarray(image))
    while True:
        for q in range(quality, MIN_STILL_QUALITY - 1, -10):
            buf = io.BytesIO()
            still.save(buf, format="JPEG", quality=q)
            if buf.tell() <= max_bytes:
                return buf.getvalue(), still.width, still.height
        if min(still.size) <= 64:
            raise ValueError(f"cannot fit a calibration still in {max_bytes} bytes")
        still = still.resize((max(1, still.width * 3 // 4), max(1, still.height * 3 // 4)), Image.LANCZOS)
