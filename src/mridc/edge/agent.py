"""The edge agent: capture -> encode -> durable queue -> transport -> cloud acks -> status.

The pieces are passed in (encoder, transport, queue, source), so tests and the fleet simulator
run the same loop with a synthetic encoder or an in-process cloud:

>>> agent = EdgeAgent(device_id="cam-01", encoder=EdgeEncoder.from_bundle(),
...                   transport=open_transport(url, "cam-01"), queue=FrameQueue(path, "cam-01"),
...                   source=open_source("camera:0", fps=0.2))
>>> report = agent.run(stop_event)

``mridc-edge run`` (edge/cli.py) reads a device config and calls ``build_agent``, the one place that
wires an agent from a config (the fleet simulator calls it too).

Delivery: a frame is accepted once it is on disk (``FrameQueue.put``). The ``Forwarder`` sends the
oldest queued frames, at most ``window`` without an ack; a frame with no ack after ``ack_timeout_s``
(or whose connection was reset) is sent again; an ack STORED/DUPLICATE/REJECTED removes it;
RETRY_LATER holds it back for ``retry_later_s``; NEED_INTRA (an inter frame whose reference the cloud
lacks) swaps in the frame's intra fallback and sends it again at once. At-least-once on the wire,
exactly-once in effect because the cloud dedupes by (device id, sequence).

Fixed cameras (``sequence=SequenceEncoder(...)``): frames are coded intra or inter against the newest frame
whose STORED ack the agent holds (`mridc.edge.sequence`); a reconnect or a NEED_INTRA forces the next frame
intra.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Protocol

from mridc.edge.calibration import CalibrationScheduler, encode_still
from mridc.edge.capture import CapturedFrame
from mridc.edge.config import CalibrationSection
from mridc.edge.queue import CALIBRATION, FrameQueue, PutResult
from mridc.edge.transport.base import Transport
from mridc.shared.protocol import AckStatus, is_final
from mridc.v1 import mridc_pb2

log = logging.getLogger("mridc.edge.agent")


class Encoder(Protocol):
    """What the agent needs from an encoder (``mridc.edge.encoder.EdgeEncoder`` has it)."""

    def encode(self, image, bpp: float = ..., **kwargs): ...  # -> result with .bitstream, .token_frame


class Forwarder:
    """Moves frames from the queue to a transport and applies the cloud's acks to the queue."""

    def __init__(self, queue: FrameQueue, transport: Transport, *, window: int = 4, ack_timeout_s: float = 60.0,
                 retry_later_s: float = 5.0) -> None:
        self.queue = queue
        self.transport = transport
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.retry_later_s = retry_later_s
        self._inflight: dict[int, float] = {}  # sequence -> resend after (monotonic)
        self._held: dict[int, float] = {}  # RETRY_LATER: sequence -> not before (monotonic)
        self._stills: set[int] = set()  # calibration stills among the in-flight sequences (one at a time)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.stats = {"sent": 0, "resent": 0, "ack_timeouts": 0, "acked": 0, "retry_later": 0, "resets": 0,
                      "need_intra": 0}
        self._ever_sent: set[int] = set()
        # Called with (sequence, status) for every ack applied (the sequence encoder learns its references).
        self.ack_listeners: list = []
        # Called (no arguments) when an ack asks for calibration stills (scene adaptation).
        self.calibration_listeners: list = []
        transport.on_ack = self._on_ack
        transport.on_reset = self._on_reset

    def _on_ack(self, ack: mridc_pb2.FrameAck) -> None:
        left = self.queue.ack(ack.sequence, ack.status)
        swapped = ack.status == AckStatus.NEED_INTRA and self.queue.use_fallback(ack.sequence)
        with self._lock:
            self._inflight.pop(ack.sequence, None)
            if swapped:  # the intra version goes out at once
                self.stats["need_intra"] += 1
                self._held.pop(ack.sequence, None)
            elif not is_final(ack.status):
                # RETRY_LATER, or a status this version does not know: keep it, resend later.
                self.stats["retry_later"] += 1
                self._held[ack.sequence] = time.monotonic() + self.retry_later_s
            else:
                self._held.pop(ack.sequence, None)
                self._ever_sent.discard(ack.sequence)
                if left:
                    self.stats["acked"] += 1
        if ack.status == mridc_pb2.FrameAck.REJECTED:
            log.warning("%s: cloud rejected frame %d: %s", self.queue.device_id, ack.sequence, ack.reason)
        if swapped:
            log.info("%s: cloud lacks the reference of frame %d; sending it intra", self.queue.device_id, ack.sequence)
        for listener in self.ack_listeners:
            try:
                listener(ack.sequence, ack.status)
            except Exception:
                log.exception("%s: ack listener failed", self.queue.device_id)
        if ack.calibrate:
            for listener in self.calibration_listeners:
                try:
                    listener()
                except Exception:
                    log.exception("%s: calibration listener failed", self.queue.device_id)
        self._wake.set()

    def _on_reset(self) -> None:
        with self._lock:
            self._inflight.clear()
            self.stats["resets"] += 1
        self._wake.set()

    def wake(self) -> None:
        """A new frame was queued (or the link came back): look at the queue now."""
        self._wake.set()

    def step(self) -> int:
        """Send what the window allows; returns how many frames were handed to the transport."""
        if not self.transport.connected:
            return 0
        now = time.monotonic()
        with self._lock:
            for seq, deadline in list(self._inflight.items()):
                if deadline <= now:
                    del self._inflight[seq]
                    self.stats["ack_timeouts"] += 1
            for seq, not_before in list(self._held.items()):
                if not_before <= now:
                    del self._held[seq]
            self._stills &= set(self._inflight)
            room = self.window - len(self._inflight)
            exclude = set(self._inflight) | set(self._held)
            still_in_flight = bool(self._stills)
        if room <= 0:
            return 0
        sent = 0
        for frame in self.queue.pending(limit=room, exclude=exclude):
            if frame.kind == CALIBRATION:
                if still_in_flight:  # one still at a time, so a burst of stills never fills the window
                    continue
                still_in_flight = True
                with self._lock:
                    self._stills.add(frame.sequence)
            # Book-keeping before the send: its ack may arrive (on the transport's thread) before send() returns,
            # and entries made after that ack would hold the frame until the ack timeout (and leak the id).
            with self._lock:
                self._inflight[frame.sequence] = time.monotonic() + self.ack_timeout_s
                resend = frame.sequence in self._ever_sent
                self._ever_sent.add(frame.sequence)
            if frame.kind == CALIBRATION and not self.transport.supports_calibration:
                # queued under another transport's config: this link cannot carry it, and never will
                log.warning("%s: transport cannot send calibration stills; dropping still %d",
                            self.queue.device_id, frame.sequence)
                with self._lock:
                    self._inflight.pop(frame.sequence, None)
                self.queue.ack(frame.sequence, AckStatus.REJECTED)
                continue
            sent_ok = (self.transport.send_calibration(frame.to_calibration()) if frame.kind == CALIBRATION
                       else self.transport.send(frame.to_envelope()))
            if not sent_ok:
                with self._lock:
                    self._inflight.pop(frame.sequence, None)
                    if not resend:
                        self._ever_sent.discard(frame.sequence)
                break
            self.queue.mark_sent(frame.sequence)
            with self._lock:
                self.stats["sent"] += 1
                self.stats["resent"] += int(resend)
            sent += 1
        return sent

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sent = self.step()
            except Exception:
                log.exception("%s: forwarder step failed", self.queue.device_id)
                sent = 0
            if not sent:
                self._wake.wait(0.2)
            self._wake.clear()


class EdgeAgent:
    """One camera: captures, encodes, queues durably, forwards, reports status."""

    def __init__(
        self,
        *,
        device_id: str,
        encoder: Encoder,
        transport: Transport,
        queue: FrameQueue,
        source: Iterable[CapturedFrame] | None = None,
        bpp: float = 0.02,
        min_bpp: float = 0.005,
        rois: list[tuple[int, int, int, int]] | None = None,
        heartbeat_s: float = 30.0,
        window: int = 4,
        ack_timeout_s: float = 60.0,
        retry_later_s: float = 5.0,
        slice_bytes: int = 0,
        prior=None,
        sequence=None,
        calibration: CalibrationSection | None = None,
    ) -> None:
        self.device_id = device_id
        # slice_bytes > 0: each frame is queued as slices of at most that size (mridc.shared.slices), which
        # a datagram transport sends one per packet. `prior` is the entropy coder's (default: the encoder's).
        self.slice_bytes = slice_bytes
        self.prior = prior if prior is not None else getattr(encoder, "prior", None)
        if slice_bytes and self.prior is None:
            raise ValueError("slice_bytes needs the token prior: pass prior= or an encoder with .prior")
        # A SequenceEncoder (mridc.edge.sequence) for inter frames, or None: every frame intra.
        self.sequence = sequence
        if sequence is not None and slice_bytes:
            raise ValueError("inter frames are not sliced: use inter frames or slices, not both")
        self.encoder = encoder
        self.transport = transport
        self.queue = queue
        self.source = source
        self.target_bpp = bpp
        self.current_bpp = bpp
        self.min_bpp = min_bpp
        self.rois = rois or []
        self.heartbeat_s = heartbeat_s
        self.forwarder = Forwarder(queue, transport, window=window, ack_timeout_s=ack_timeout_s,
                                   retry_later_s=retry_later_s)
        self.stats = {"captured": 0, "accepted": 0, "refused": 0, "dropped_oldest": 0, "encode_errors": 0,
                      "bpp_lowered": 0, "slices": 0, "intra": 0, "inter": 0, "calibration": 0}
        self._connects_seen = 0
        if sequence is not None:
            self.forwarder.ack_listeners.append(self._sequence_ack)
        # Calibration stills (scene adaptation): at start-up, on a schedule and when the cloud asks.
        self.calibration = CalibrationScheduler(calibration or CalibrationSection())
        if self.calibration.config.enabled and not transport.supports_calibration:
            raise ValueError("calibration stills need a transport that carries them (MQTT)")
        self.forwarder.calibration_listeners.append(self.calibration.request)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted_sequences: list[int] = []  # this run's accepted frames, in order (for tests/reports)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect and start forwarding (already queued frames go out even before any capture)."""
        if self._threads:
            return
        self._stop.clear()
        self.transport.start()
        for name, target in (("forwarder", self.forwarder.run), ("heartbeat", self._heartbeat_loop)):
            thread = threading.Thread(target=target, args=(self._stop,), name=f"{name}-{self.device_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if hasattr(self.source, "close"):
            self.source.close()
        self.forwarder.wake()
        for thread in self._threads:
            thread.join(5)
        self._threads = []
        self.transport.close()

    def status(self) -> dict:
        return {
            "device_id": self.device_id,
            "bpp": round(self.current_bpp, 5),
            "agent": dict(self.stats),
            "queue": self.queue.stats(),
            "forwarder": dict(self.forwarder.stats),
            "transport": dict(self.transport.stats),
            "connected": self.transport.connected,
        }

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        was_connected = False
        next_beat = 0.0
        while not stop.is_set():
            connected = self.transport.connected
            if connected and (not was_connected or time.monotonic() >= next_beat):
                try:
                    self.transport.publish_status(self.status())
                except Exception:
                    log.exception("%s: heartbeat failed", self.device_id)
                next_beat = time.monotonic() + self.heartbeat_s
            was_connected = connected
            stop.wait(min(0.5, self.heartbeat_s))

    # -- capture side --------------------------------------------------------------------------------
    def _sequence_ack(self, sequence: int, status: int) -> None:
        if status == AckStatus.NEED_INTRA:
            self.sequence.force_intra("the cloud lacks a reference (NEED_INTRA)")
        elif is_final(status):
            self.sequence.acknowledge(sequence, stored=status in (AckStatus.STORED, AckStatus.DUPLICATE))

    def _submit_sequence(self, image, capture_time_us: int | None) -> PutResult | None:
        """Inter/intra coding: the frame's sequence number is the queue's next (this is its only producer)."""
        from mridc.shared.bitstream import compress

        connects = self.transport.stats.get("connects", 0)
        if self._connects_seen and connects > self._connects_seen:
            self.sequence.force_intra("reconnect")
        self._connects_seen = connects
        sequence = self.queue.next_sequence
        try:
            coded = self.sequence.encode(image, sequence, self.current_bpp)
        except Exception:
            self.stats["encode_errors"] += 1
            log.exception("%s: encoding failed", self.device_id)
            return None
        fallback = None
        if coded.kind == "inter":  # the same grid coded alone, for a cloud that lacks the reference
            fallback = compress(self.sequence.intra_frame(coded), self.prior)
        meta = {"bpp": f"{coded.bpp:.5f}", "target_bpp": f"{self.current_bpp:.5f}", "kind": coded.kind}
        if coded.ref_sequence is not None:
            meta["ref"] = str(coded.ref_sequence)
        put = self.queue.put(coded.bitstream, capture_time_us=capture_time_us, model_id=self.sequence.model_id,
                             meta=meta, fallback=fallback)
        if put.accepted and put.sequence == sequence:
            self.stats[coded.kind] += 1
        else:
            self.sequence.forget(sequence)
            if put.accepted:  # another producer took a number: the chain is unsafe, start again
                self.sequence.force_intra("sequence mismatch")
        return put

    def submit(self, image, capture_time_us: int | None = None) -> PutResult | None:
        """Encode one RGB frame and put it in the queue. Returns the queue's verdict (None: encode failed).
        When a calibration still is due, the frame is also queued as one, after the live frame."""
        put = self._submit_live(image, capture_time_us)
        reason = self.calibration.due()
        if reason is not None:
            self._submit_still(image, capture_time_us, reason)
        return put

    def _submit_still(self, image, capture_time_us: int | None, reason: str) -> None:
        cfg = self.calibration.config
        try:
            still, width, height = encode_still(image, cfg.max_bytes, cfg.quality)
        except Exception:
            log.exception("%s: calibration still failed", self.device_id)
            return
        model_id = int(getattr(self.encoder, "model_id", 0) or 0)
        put = self.queue.put(still, capture_time_us=capture_time_us, model_id=model_id, kind=CALIBRATION,
                             meta={"format": "jpeg", "width": str(width), "height": str(height), "reason": reason})
        if put.accepted:
            self.stats["calibration"] += 1
            self.forwarder.wake()
            log.info("%s: calibration still %d queued (%s, %d bytes)", self.device_id, put.sequence, reason,
                     len(still))
        else:
            log.warning("%s: calibration still refused by the queue: %s", self.device_id, put.reason)

    def _submit_live(self, image, capture_time_us: int | None) -> PutResult | None:
        self.stats["captured"] += 1
        if self.sequence is not None:
            put = self._submit_sequence(image, capture_time_us)
            if put is not None:
                self._after_put(put)
            return put
        kwargs = {"bpp": self.current_bpp}
        if self.rois:
            kwargs["rois"] = self.rois
        try:
            result = self.encoder.encode(image, **kwargs)
        except Exception:
            self.stats["encode_errors"] += 1
            log.exception("%s: encoding failed", self.device_id)
            return None
        token_frame = getattr(result, "token_frame", None)
        model_id = int(getattr(token_frame, "model_id", 0) or 0)
        meta = {"bpp": f"{getattr(result, 'bpp', 0.0):.5f}", "target_bpp": f"{self.current_bpp:.5f}"}
        bitstream = result.bitstream
        if self.slice_bytes:
            from mridc.shared.slices import compress_sliced, pack_slices

            try:
                slices = compress_sliced(token_frame, self.prior, self.slice_bytes)
            except ValueError as exc:  # one token row does not fit: send the frame whole rather than not at all
                log.warning("%s: cannot slice at %d bytes (%s); sending the frame whole", self.device_id,
                            self.slice_bytes, exc)
            else:
                bitstream = pack_slices(slices)
                meta["slices"] = str(len(slices))
                self.stats["slices"] += len(slices)
        put = self.queue.put(bitstream, capture_time_us=capture_time_us, model_id=model_id, meta=meta)
        self._after_put(put)
        return put

    def _after_put(self, put: PutResult) -> None:
        if put.accepted:
            self.stats["accepted"] += 1
            self.accepted_sequences.append(put.sequence)
            self.forwarder.wake()
        else:
            self.stats["refused"] += 1
            log.warning("%s: frame refused by the queue: %s", self.device_id, put.reason)
        if put.dropped:
            self.stats["dropped_oldest"] += len(put.dropped)
            log.warning("%s: queue full, dropped oldest frames %s", self.device_id, list(put.dropped))
            if self.sequence is not None:
                for seq in put.dropped:
                    self.sequence.forget(seq)
        self._adapt_bpp(put)

    def _adapt_bpp(self, put: PutResult) -> None:
        if put.lower_bpp and self.current_bpp > self.min_bpp:
            self.current_bpp = max(self.min_bpp, self.current_bpp * 0.75)
            self.stats["bpp_lowered"] += 1
            log.warning("%s: queue under pressure, bpp lowered to %.4f", self.device_id, self.current_bpp)
        elif not put.lower_bpp and self.current_bpp < self.target_bpp and self.queue.stats()["fill"] < 0.5:
            self.current_bpp = min(self.target_bpp, self.current_bpp / 0.75)

    def run(self, stop: threading.Event | None = None, *, max_frames: int | None = None,
            drain_timeout_s: float = 0.0) -> dict:
        """Capture until the source ends, ``stop`` is set or ``max_frames``; then wait up to
        ``drain_timeout_s`` for the queue to empty. Returns the final status."""
        stop = stop or threading.Event()
        self.start()
        try:
            if self.source is not None:
                for frame in self.source:
                    if stop.is_set():
                        break
                    self.submit(frame.image, frame.capture_time_us)
                    if max_frames is not None and self.stats["captured"] >= max_frames:
                        break
            deadline = time.monotonic() + drain_timeout_s
            if drain_timeout_s > 0 and len(self.queue) and not stop.is_set():
                log.info("%s: source done; waiting up to %.0f s for %d queued frame(s) to be acknowledged",
                         self.device_id, drain_timeout_s, len(self.queue))
            while len(self.queue) and time.monotonic() < deadline and not stop.is_set():
                stop.wait(0.1)
            status = self.status()
            status["undelivered"] = [f.sequence for f in self.queue.pending(limit=max(1, len(self.queue)))]
            return status
        finally:
            self.stop()

    @property
    def source_is_finite(self) -> bool:
        """A video file or an image folder that does not loop (a camera runs until it is stopped)."""
        return self.source is not None and getattr(self.source, "kind", "camera") != "camera" and not getattr(
            self.source, "loop", False)


def build_transport(config) -> Transport:
    from mridc.edge.transport import Backoff, TlsFiles, open_transport

    t = config.transport
    tls = None
    if t.ca_file or t.cert_file or t.url.split("://", 1)[0].endswith("s"):
        tls = TlsFiles(t.ca_file or None, t.cert_file or None, t.key_file or None)
    backoff = Backoff(t.backoff_initial_s, t.backoff_max_s)
    options = {"keepalive_s": t.keepalive_s, "backoff": backoff}
    if t.url.startswith("mqtt"):
        options["session_expiry_s"] = t.session_expiry_s
    elif t.url.startswith("coap"):
        options = {"mtu": t.mtu, "retransmit": t.retransmit, "deadline_s": t.deadline_s}
    else:
        options["connect_deadline_s"] = t.connect_deadline_s
    return open_transport(t.url, config.device.id, username=t.username or None, password=config.password(),
                          token=config.token(), tls=tls, **options)


def build_agent(config, encoder: Encoder, *, source=None, max_frames: int | None = None) -> EdgeAgent:
    """An ``EdgeAgent`` for a validated config; ``source`` defaults to ``config.source``."""
    from mridc.edge.capture import open_source

    if source is None:
        size = (config.source.width, config.source.height) if config.source.width else None
        source = open_source(config.source.uri, fps=config.source.fps, size=size, loop=config.source.loop,
                             max_frames=max_frames)
    queue = FrameQueue(config.queue_path(), config.device.id, max_frames=config.queue.max_frames,
                       max_bytes=int(config.queue.max_mb * 1024 * 1024), policy=config.queue.policy)
    transport = build_transport(config)
    # Over a datagram link every frame goes as slices that fit one datagram, unless the config sets a size.
    sequence = None
    if config.encoder.inter:
        from mridc.edge.sequence import SequenceConfig, SequenceEncoder

        sequence = SequenceEncoder(encoder, SequenceConfig(refresh_period=config.encoder.refresh_frames))
    slice_bytes = 0 if sequence is not None else (
        config.encoder.slice_bytes or getattr(transport, "max_slice_bytes", 0))
    return EdgeAgent(
        device_id=config.device.id, encoder=encoder, transport=transport, queue=queue, source=source,
        bpp=config.encoder.bpp, min_bpp=config.encoder.min_bpp,
        rois=[(r.x, r.y, r.w, r.h) for r in config.encoder.rois], heartbeat_s=config.status.heartbeat_s,
        window=config.transport.window, ack_timeout_s=config.transport.ack_timeout_s, slice_bytes=slice_bytes,
        sequence=sequence, calibration=config.calibration,
    )


__all__ = ["EdgeAgent", "Forwarder", "build_agent", "build_transport"]
