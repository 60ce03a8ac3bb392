"""The transport interface the edge agent codes against, and the pieces every transport shares."""

from __future__ import annotations

import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from mridc.v1 import mridc_pb2

AckCallback = Callable[[mridc_pb2.FrameAck], None]


class TransportError(RuntimeError):
    """Bad transport URL or options."""


@dataclass(frozen=True)
class TlsFiles:
    """Client-side TLS: the CA that signed the server, and optionally a client certificate + key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Backoff:
    """Exponential backoff with jitter: ``initial * multiplier**n``, capped at ``maximum``.

    Each delay is drawn uniformly from ``[(1 - jitter) * d, d]`` so a fleet that lost the same
    broker does not come back in lock step.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, multiplier: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1 or not 0 <= jitter <= 1:
            raise ValueError("backoff needs 0 < initial <= maximum, multiplier >= 1, 0 <= jitter <= 1")
        self.initial, self.maximum, self.multiplier, self.jitter = initial, maximum, multiplier, jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.multiplier ** self.attempt)
        self.attempt += 1
        return ceiling * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0


class Transport(ABC):
    """Carries ``FrameEnvelope`` messages to the cloud and ``FrameAck`` messages back.

    A transport connects in the background and reconnects by itself (with ``Backoff``) until
    ``close()``. The agent sets two callbacks before ``start()``:

    - ``on_ack(ack)``: a ``FrameAck`` arrived (called on a transport thread);
    - ``on_reset()``: frames sent so far may have been lost with the connection and should be
      sent again (e.g. a gRPC stream broke). MQTT with a persistent session does not need it.
    """

    scheme: str = ""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.on_ack: AckCallback | None = None
        self.on_reset: Callable[[], None] | None = None
        self._connected = threading.Event()
        self.stats = {"connects": 0, "disconnects": 0, "frames_sent": 0, "acks_received": 0, "bytes_sent": 0}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @abstractmethod
    def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    @abstractmethod
    def send(self, envelope: mridc_pb2.FrameEnvelope) -> bool:
        """Hand one frame to the wire. False when not connected (the caller keeps it queued)."""

    # Whether `send_calibration` can carry calibration stills (scene adaptation): MQTT only for now.
    supports_calibration = False

    def send_calibration(self, message: mridc_pb2.CalibrationFrame) -> bool:
        """Hand one calibration still to the wire; False when not connected or not supported."""
        return False

    def publish_status(self, status: dict) -> None:
        """Publish a device heartbeat (MQTT: retained JSON on the status topic). Optional."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly and stop background threads."""

    def _deliver_ack(self, ack: mridc_pb2.FrameAck) -> None:
        self.stats["acks_received"] += 1
        if self.on_ack is not None:
            self.on_ack(ack)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
