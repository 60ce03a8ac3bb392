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
from dataclasses import dataclass

import numpy as np

STARTUP, SCHEDULE, REQUEST = "startup", "schedule", "request"
MIN_QUALITY = 40  # below this a still is downscaled instead: blocking artefacts would be learnt as the scene


@dataclass
class CalibrationSection:
    enabled: bool = False  # send calibration stills (MQTT transports only)
    frames: int = 3  # stills per round
    every_frames: int = 5  # live frames between two stills of a round
    interval_s: float = 86400.0  # a new round this often (0: only at start-up and on request)
    at_startup: bool = True  # a round when the agent starts
    max_bytes: int = 150_000  # per still: the JPEG quality (then the size) is lowered to fit
    quality: int = 90  # JPEG quality to start from

    def validate(self) -> None:
        from mridc.edge.config import ConfigError

        if self.frames < 1 or self.every_frames < 1:
            raise ConfigError("calibration.frames and calibration.every_frames must be >= 1")
        if self.interval_s < 0:
            raise ConfigError(f"calibration.interval_s must be >= 0, got {self.interval_s}")
        if not 10_000 <= self.max_bytes <= 4_000_000:
            raise ConfigError(f"calibration.max_bytes must be in [10000, 4000000], got {self.max_bytes}")
        if not MIN_QUALITY <= self.quality <= 100:
            raise ConfigError(f"calibration.quality must be in [{MIN_QUALITY}, 100], got {self.quality}")


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
        for q in range(quality, MIN_QUALITY - 1, -10):
            buf = io.BytesIO()
            still.save(buf, format="JPEG", quality=q)
            if buf.tell() <= max_bytes:
                return buf.getvalue(), still.width, still.height
        if min(still.size) <= 64:
            raise ValueError(f"cannot fit a calibration still in {max_bytes} bytes")
        still = still.resize((max(1, still.width * 3 // 4), max(1, still.height * 3 // 4)), Image.LANCZOS)
