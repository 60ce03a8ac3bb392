"""CoAP ingest: frames from datagram links (LoRa, NB-IoT, satellite) as slices that each decode alone.

Two resources on one UDP port (the wire contract is in `mridc.shared.protocol`, "datagram links"):
- ``POST /s``: a ``SliceDatagram``, non-confirmable with No-Response: one slice of a frame. No answer, so a
  lossy link carries no ack traffic per slice.
- ``POST /q``: a ``SliceQuery`` -> ``SliceReport``: the bitmap of the frame's slices held here, and the ack
  status once the frame is stored with all of them.

A frame's slices are gathered in memory (`SliceAssembler`). The frame goes to the decode service when all its
slices are in, or at its deadline (first slice + the device's ``deadline_ms``, capped) with what arrived: the
rows of the missing slices are masked tokens for BPCG to fill. A slice that arrives after that makes a new
version: the frame is decoded again and the store replaces the picture (``versions.updates`` in the sidecar).

Every datagram is checked before it costs anything: size, parse, device id, HMAC under the device's key, a
per-device datagram rate, and the slice's own CRC and model id. Each drop is counted in
``mridc_datagrams{kind, result}``; decoding goes on.

Nothing is lost on a restart: the gathered slices live in memory, but the device keeps the frame in its
durable queue until a report says the frame is stored with every slice, and sends what a report shows
missing. A partial frame stored before the restart is reopened from its kept stream when more slices come.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mridc.shared.protocol import (
    COAP_QUERY_PATH,
    COAP_SLICE_PATH,
    AckStatus,
    DatagramError,
    build_envelope,
    is_final,
    join_slices,
    parse_datagram,
    sign,
    slice_bitmap,
    verify,
)
from mridc.shared.slices import MAX_SLICE_BYTES, is_slice, is_sliced_file, pack_slices, unpack_slices
from mridc.v1 import mridc_pb2

from .config import ServiceConfig
from .ratelimit import DeviceRateLimiter
from .security import TokenAuthority
from .worker import DecodeService

log = logging.getLogger("mridc.cloud.service.coap")

DEFAULT_DEADLINE_S = 5.0  # when a datagram says deadline_ms = 0


@dataclass
class GatheredFrame:
    """One frame's slices as they arrive, and what became of the versions decoded from them."""

    device_id: str
    sequence: int
    capture_time_us: int
    model_id: int
    slice_count: int
    deadline: float  # monotonic: decode what is here by then
    slices: dict[int, bytes] = field(default_factory=dict)
    submitted: int = 0  # slices in the version last handed to the decoder (0: none yet)
    in_flight: bool = False
    status: int = AckStatus.UNSPECIFIED  # the ack of the last version decoded
    reason: str = ""
    not_before: float = 0.0  # RETRY_LATER: not again before this
    touched: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return self.device_id, self.sequence

    @property
    def complete(self) -> bool:
        return len(self.slices) == self.slice_count

    def bitstream(self) -> bytes:
        return join_slices([self.slices[i] for i in sorted(self.slices)], self.slice_count)

    def report_status(self) -> int:
        """The status a device sees: the last ack, once the version it belongs to holds every slice here."""
        if self.in_flight or self.submitted < len(self.slices):
            return AckStatus.UNSPECIFIED
        return self.status


class SliceAssembler:
    """Which slices each frame has and which frames are due for decoding. No sockets, no decoder; thread-safe."""

    def __init__(self, *, max_deadline_s: float = 60.0, max_frames: int = 4096, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_deadline_s = max_deadline_s
        self.max_frames = max_frames
        self.ttl_s = ttl_s
        self.clock = clock
        self.frames: dict[tuple[str, int], GatheredFrame] = {}
        self.lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.frames)

    def get(self, device_id: str, sequence: int) -> GatheredFrame | None:
        with self.lock:
            return self.frames.get((device_id, sequence))

    def open(self, datagram: mridc_pb2.SliceDatagram, *, seed: dict[int, bytes] | None = None,
             seed_status: int = AckStatus.UNSPECIFIED) -> GatheredFrame:
        """The frame of this datagram, opened if new: `seed` = slices already stored (a partial frame that a
        previous run decoded), so that late slices add to them."""
        now = self.clock()
        key = (datagram.device_id, datagram.sequence)
        with self.lock:
            frame = self.frames.get(key)
            if frame is None:
                if len(self.frames) >= self.max_frames:
                    self._evict_oldest()
                deadline_s = datagram.deadline_ms / 1000 if datagram.deadline_ms else DEFAULT_DEADLINE_S
                frame = GatheredFrame(datagram.device_id, datagram.sequence, datagram.capture_time_us,
                                      datagram.model_id, datagram.slice_count,
                                      deadline=now + min(deadline_s, self.max_deadline_s), touched=now)
                if seed:
                    frame.slices.update(seed)
                    frame.submitted = len(seed)
                    frame.status = seed_status
                self.frames[key] = frame
            return frame

    def add(self, datagram: mridc_pb2.SliceDatagram) -> str:
        """Place one slice: "accepted", "duplicate" (held already), or "conflict" (disagrees with the frame)."""
        frame = self.open(datagram)
        with self.lock:
            frame.touched = self.clock()
            if (datagram.slice_count, datagram.model_id, datagram.capture_time_us) != (
                    frame.slice_count, frame.model_id, frame.capture_time_us):
                return "conflict"
            held = frame.slices.get(datagram.slice_index)
            if held is not None:
                return "duplicate" if held == datagram.slice else "conflict"
            frame.slices[datagram.slice_index] = datagram.slice
            return "accepted"

    def take_due(self) -> list[tuple[GatheredFrame, bytes, list[int], bool]]:
        """Frames to decode now, marked in flight: (frame, bitstream, slice indexes, is an update)."""
        now = self.clock()
        due = []
        with self.lock:
            for frame in self.frames.values():
                if frame.in_flight or now < frame.not_before or frame.status == AckStatus.REJECTED:
                    continue
                if len(frame.slices) <= frame.submitted or not (frame.complete or now >= frame.deadline):
                    continue
                frame.in_flight = True
                due.append((frame, frame.bitstream(), sorted(frame.slices), frame.submitted > 0))
        return due

    def finished(self, frame: GatheredFrame, held: int, ack: mridc_pb2.FrameAck) -> None:
        """The decode service answered the version with `held` slices."""
        with self.lock:
            frame.in_flight = False
            frame.touched = self.clock()
            if is_final(ack.status):
                frame.submitted = max(frame.submitted, held)
                frame.status, frame.reason = ack.status, ack.reason
            else:  # RETRY_LATER: try the same version again in a second
                frame.not_before = self.clock() + 1.0

    def expire(self) -> int:
        """Forget frames untouched for ttl_s (answered ones stay in the store; queries then read it there)."""
        cutoff = self.clock() - self.ttl_s
        with self.lock:
            old = [k for k, f in self.frames.items() if f.touched < cutoff and not f.in_flight]
            for key in old:
                del self.frames[key]
        return len(old)

    def _evict_oldest(self) -> None:
        idle = [f for f in self.frames.values() if not f.in_flight]
        if idle:
            del self.frames[min(idle, key=lambda f: f.touched).key]
            self.evicted += 1


def free_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class CoapIngest:
    """The CoAP server (aiocoap, on its own event-loop thread) and the thread that hands due frames over."""

    def __init__(self, config: ServiceConfig, service: DecodeService) -> None:
        self.config = config
        self.service = service
        self.metrics = service.metrics
        self.tokens = TokenAuthority.from_file(config.coap_tokens) if config.coap_tokens else None
        self.assembler = SliceAssembler(max_deadline_s=config.coap_max_deadline_s,
                                        max_frames=config.coap_max_pending_frames, ttl_s=config.coap_frame_ttl_s)
        self.rate = DeviceRateLimiter(config.coap_datagram_rate, config.coap_datagram_burst)
        host, _, port = config.coap_addr.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port) or free_udp_port(self.host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._serve, name="mridc-coap", daemon=True),
                         threading.Thread(target=self._submit_loop, name="mridc-coap-submit", daemon=True)]
        self._threads[0].start()
        if not self._ready.wait(15) or self._error is not None:
            raise OSError(f"cannot serve CoAP on {self.host}:{self.port}: {self._error}")
        self._threads[1].start()

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        for thread in self._threads:
            thread.join(5)

    async def _shutdown(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
        asyncio.get_running_loop().stop()

    def _serve(self) -> None:
        import aiocoap
        from aiocoap import resource

        ingest = self

        class Slices(resource.Resource):
            async def render_post(self, request):
                ingest.handle_slice(request.payload)
                return aiocoap.Message(code=aiocoap.CHANGED)  # suppressed by the request's No-Response

        class Queries(resource.Resource):
            async def render_post(self, request):
                report = ingest.handle_query(request.payload)
                if report is None:
                    return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
                return aiocoap.Message(code=aiocoap.CONTENT, payload=report)

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        site = resource.Site()
        site.add_resource([COAP_SLICE_PATH], Slices())
        site.add_resource([COAP_QUERY_PATH], Queries())
        try:
            self._context = loop.run_until_complete(aiocoap.Context.create_server_context(
                site, bind=(self.host, self.port), transports=["udp6"]))
        except Exception as exc:  # noqa: BLE001 (port in use, bad address: reported by start())
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        log.info("coap ingest listening", extra={"fields": {"addr": f"{self.host}:{self.port}"}})
        try:
            loop.run_forever()
        finally:
            loop.close()

    # -- datagrams (event-loop thread; each is cheap) ----------------------------------------------------
    def _key(self, device_id: str) -> tuple[bool, bytes | None]:
        """(known device, its MAC key). Without a token file (allow_insecure) every device is known, unsigned."""
        if self.tokens is None:
            return True, None
        key = self.tokens.key_for(device_id)
        return key is not None, key

    def _authentic(self, message, kind: str) -> bool:
        known, key = self._key(message.device_id)
        if not known:
            self.metrics.datagrams.labels(kind, "unknown_device").inc()
            return False
        if key is not None and not verify(message, key):
            self.metrics.datagrams.labels(kind, "bad_mac").inc()
            return False
        if not self.rate.allow(message.device_id):
            self.metrics.datagrams.labels(kind, "rate_limited").inc()
            return False
        return True

    def handle_slice(self, payload: bytes) -> str:
        """Take one slice datagram; returns the result it was counted under."""
        try:
            datagram = parse_datagram(payload, mridc_pb2.SliceDatagram, max_bytes=self.config.coap_max_datagram_bytes)
            if len(datagram.slice) > MAX_SLICE_BYTES:
                raise DatagramError("too_large", f"slice of {len(datagram.slice)} bytes")
        except DatagramError as exc:
            self.metrics.datagrams.labels("slice", exc.code).inc()
            return exc.code
        if not self._authentic(datagram, "slice"):
            return "refused"
        result = self._check_slice(datagram)
        if result is None:
            if self.assembler.get(datagram.device_id, datagram.sequence) is None:
                self._reopen_stored(datagram)
            result = self.assembler.add(datagram)
            self.metrics.gathering_frames.set(len(self.assembler))
        self.metrics.datagrams.labels("slice", result).inc()
        return result

    def _check_slice(self, datagram: mridc_pb2.SliceDatagram) -> str | None:
        """The slice's own CRC, header and model id (the decoder's cheap parse), before it is held."""
        known = self.service.known_model_ids
        if known is not None and datagram.model_id not in known:
            return "unknown_model"
        single = datagram.slice_count == 1 and not is_slice(datagram.slice)
        try:
            frame = self.service.decoder.validate(datagram.slice if single else pack_slices([datagram.slice]))
        except ValueError:
            return "bad_slice"
        if getattr(frame, "model_id", datagram.model_id) != datagram.model_id:
            return "model_id_mismatch"
        return None

    def _reopen_stored(self, datagram: mridc_pb2.SliceDatagram) -> None:
        """A late slice of a frame stored partially before (another run): start from the slices it holds."""
        store = self.service.store
        stored = store.stored_slices(datagram.device_id, datagram.sequence)
        if stored is None or stored[0] >= stored[1]:
            return
        try:
            record = store.load_record(datagram.device_id, datagram.sequence)
            held = record.slices.get("held", [])
            slices = unpack_slices(store.load_bitstream(datagram.device_id, datagram.sequence))
        except (OSError, ValueError) as exc:
            log.warning("cannot reopen a stored partial frame", extra={"fields": {
                "device": datagram.device_id, "sequence": datagram.sequence, "reason": str(exc)}})
            return
        if len(held) == len(slices) and record.slices.get("count") == datagram.slice_count:
            self.assembler.open(datagram, seed=dict(zip(held, slices, strict=True)), seed_status=AckStatus.STORED)

    def handle_query(self, payload: bytes) -> bytes | None:
        """A SliceQuery -> the signed SliceReport bytes; None for a query that is dropped (counted)."""
        try:
            query = parse_datagram(payload, mridc_pb2.SliceQuery, max_bytes=self.config.coap_max_datagram_bytes)
        except DatagramError as exc:
            self.metrics.datagrams.labels("query", exc.code).inc()
            return None
        if not self._authentic(query, "query"):
            return None
        self.metrics.datagrams.labels("query", "accepted").inc()
        report = mridc_pb2.SliceReport(device_id=query.device_id, sequence=query.sequence, nonce=query.nonce)
        frame = self.assembler.get(query.device_id, query.sequence)
        if frame is not None:
            with self.assembler.lock:
                report.status = frame.report_status()
                report.reason = frame.reason[:200]
                report.slice_count = frame.slice_count
                report.received = slice_bitmap(frame.slices, frame.slice_count)
        else:
            stored = self.service.store.stored_slices(query.device_id, query.sequence)
            if stored is not None:
                held, count = stored
                report.status = AckStatus.STORED
                report.slice_count = count
                indexes = range(count) if held >= count else self._stored_indexes(query.device_id, query.sequence)
                report.received = slice_bitmap(indexes, count)
        return sign(report, self._key(query.device_id)[1]).SerializeToString()

    def _stored_indexes(self, device_id: str, sequence: int) -> list[int]:
        try:
            return list(self.service.store.load_record(device_id, sequence).slices.get("held", []))
        except (OSError, ValueError):
            return []

    # -- hand-over to the decode service (its own thread: validation and the index are not for the loop) ----
    def _submit_loop(self) -> None:
        next_expiry = 0.0
        while not self._stop.wait(0.05):
            for frame, bitstream, held, update in self.assembler.take_due():
                self._submit(frame, bitstream, held, update)
            if time.monotonic() >= next_expiry:
                self.assembler.expire()
                self.metrics.gathering_frames.set(len(self.assembler))
                next_expiry = time.monotonic() + 5.0

    def _submit(self, frame: GatheredFrame, bitstream: bytes, held: list[int], update: bool) -> None:
        envelope = build_envelope(frame.device_id, frame.sequence, bitstream, frame.model_id,
                                  capture_time_us=frame.capture_time_us,
                                  meta={"slices": f"{len(held)}/{frame.slice_count}"})
        if len(held) < frame.slice_count and not update:
            self.metrics.frames_partial.inc()
        sliced = is_sliced_file(bitstream)

        def done(ack: mridc_pb2.FrameAck) -> None:
            self.assembler.finished(frame, len(held), ack)

        try:
            self.service.submit(envelope, "coap", done,
                                authenticated_device=frame.device_id if self.tokens is not None else None,
                                payload_bytes=len(bitstream), wait=0.0,
                                slices=(held, frame.slice_count) if sliced else None, update=update)
        except Exception:  # never leave the frame in flight forever
            log.exception("coap submit failed", extra={"fields": {"device": frame.device_id,
                                                                  "sequence": frame.sequence}})
            self.assembler.finished(frame, len(held), mridc_pb2.FrameAck(status=AckStatus.RETRY_LATER))
