"""Per-device token bucket. In-memory and per worker process: N workers admit up to N x the rate."""

from __future__ import annotations

import threading
import time


class DeviceRateLimiter:
    """`rate` frames per second sustained, `burst` at once. rate <= 0 admits everything."""

    def __init__(self, rate: float, burst: int, *, clock=time.monotonic, max_devices: int = 100_000):
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, last time)
        self._lock = threading.Lock()
        self._max_devices = max_devices

    def allow(self, device_id: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(device_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            if len(self._buckets) >= self._max_devices and device_id not in self._buckets:
                self._buckets.clear()  # bounded memory under a flood of unknown ids; full buckets again
            self._buckets[device_id] = (tokens, now)
        return allowed
