"""CoAP transport: a frame goes out as slices over UDP, for lossy datagram links (LoRa, NB-IoT, satellite).

Each slice of the frame (`mridc.shared.slices`; a frame encoded without slices is one datagram) is a
``SliceDatagram`` sent non-confirmable with No-Response to ``/s``, so a lost packet costs one band of tokens
and the link carries no per-packet acks. Then the device asks ``/q`` what arrived (a ``SliceQuery``; the
``SliceReport`` answer holds the bitmap of slices the cloud holds and, once stored, the ack status):

- with retransmission (the default), it sends again the slices the report shows missing, until the cloud
  holds them all or ``resend_window_s`` has passed. The cloud decodes what it has at the frame's deadline
  (``deadline_s``, sent in each datagram) and again when late slices complete it;
- with ``retransmit=False`` (``--no-retransmit``) every slice goes out once and is never sent again. A frame
  of which no slice arrived is given up after ``deadline_s`` + ``give_up_s`` and dropped from the queue with
  a REJECTED ack (counted as ``frames_lost``): the user chose a link without resends.

The ack reaches the agent only when the cloud holds every slice (or, without retransmission, once it stored
what it got), so the durable queue keeps the frame until then. Every datagram is signed with the device key
(the SHA-256 of its token; the token itself never crosses the link), and reports are checked the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from mridc.edge.transport.base import Transport, TransportError
from mridc.shared.protocol import (
    COAP_QUERY_PATH,
    COAP_SLICE_PATH,
    MAC_BYTES,
    AckStatus,
    bitmap_indexes,
    build_ack,
    device_key,
    frame_slices,
    is_final,
    sign,
    verify,
)
from mridc.v1 import mridc_pb2

log = logging.getLogger("mridc.edge.coap")

DEFAULT_MTU = 1152  # RFC 7252's recommended upper bound for a CoAP message
# CoAP's own bytes around the payload: header 4, token, Uri-Path "s" 2, No-Response 4, payload marker 1. With
# aiocoap's 2-byte tokens that is 12 (tests/test_service_coap.py checks it); 16 leaves room for a 6-byte token.
COAP_HEADER_BYTES = 16


def datagram_overhead(device_id: str) -> int:
    """Bytes a datagram adds around its slice (CoAP header and the SliceDatagram fields), for this device."""
    probe = mridc_pb2.SliceDatagram(device_id=device_id, sequence=2**40, capture_time_us=2**62, model_id=2**32 - 1,
                                    slice_index=1023, slice_count=1024, slice=b"\0" * 1000, deadline_ms=600_000,
                                    mac=b"\0" * MAC_BYTES)
    return probe.ByteSize() - 1000 + COAP_HEADER_BYTES


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class CoapTransport(Transport):
    scheme = "coap"

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        *,
        token: str | None = None,
        retransmit: bool = True,
        deadline_s: float = 5.0,
        resend_window_s: float = 120.0,
        query_interval_s: float = 0.5,
        query_timeout_s: float = 2.0,
        give_up_s: float = 30.0,
        mtu: int = DEFAULT_MTU,
        pace_s: float = 0.0,
    ) -> None:
        super().__init__(device_id)
        if not 0 < deadline_s <= 3600 or query_interval_s <= 0 or query_timeout_s <= 0 or mtu < 64:
            raise TransportError("coap: deadline_s in (0, 3600], query_interval_s, query_timeout_s > 0, mtu >= 64")
        self.host, self.port = host, port
        self.key = device_key(token) if token else None
        self.retransmit = retransmit
        self.deadline_s = deadline_s
        self.resend_window_s = resend_window_s
        self.query_interval_s = query_interval_s
        self.query_timeout_s = query_timeout_s
        self.give_up_s = give_up_s
        self.mtu = mtu
        self.pace_s = pace_s
        self.uri = f"coap://{'[' + host + ']' if ':' in host else host}:{port}"
        self.stats.update({"slices_sent": 0, "slices_resent": 0, "queries": 0, "query_timeouts": 0,
                           "bad_reports": 0, "frames_lost": 0, "oversized": 0})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: dict[int, asyncio.Task] = {}
        self._stopping = False
        # Slices sent per frame (first sends and resends), for benchmarks; the last 1024 frames.
        self.slices_sent_by_sequence: dict[int, int] = {}

    @property
    def max_slice_bytes(self) -> int:
        """The largest slice that keeps a datagram within the MTU."""
        return self.mtu - datagram_overhead(self.device_id)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"coap-{self.device_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise TransportError("coap: the client context did not start")

    def _run(self) -> None:
        import aiocoap

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._context = loop.run_until_complete(aiocoap.Context.create_client_context(transports=["udp6"]))
        # Datagrams need no connection: the transport can always send; acks say what arrived.
        self._connected.set()
        self.stats["connects"] += 1
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._context.shutdown())
            loop.close()

    def close(self, timeout: float = 3.0) -> None:
        self._stopping = True
        self._connected.clear()
        loop = self._loop
        if loop is not None and loop.is_running():
            def stop_all() -> None:
                for task in self._tasks.values():
                    task.cancel()
                loop.call_later(0.05, loop.stop)

            loop.call_soon_threadsafe(stop_all)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- sending -----------------------------------------------------------------------------------------
    def send(self, envelope: mridc_pb2.FrameEnvelope) -> bool:
        loop = self._loop
        if loop is None or self._stopping or not self._connected.is_set():
            return False
        copy = mridc_pb2.FrameEnvelope()
        copy.CopyFrom(envelope)

        def schedule() -> None:
            task = self._tasks.get(copy.sequence)
            if task is not None and not task.done():
                return  # this frame's delivery is still under way (resends are its business)
            self._tasks[copy.sequence] = loop.create_task(self._deliver(copy))

        loop.call_soon_threadsafe(schedule)
        self.stats["frames_sent"] += 1
        return True

    def _datagrams(self, envelope: mridc_pb2.FrameEnvelope) -> list[bytes]:
        slices = frame_slices(envelope.bitstream)
        out = []
        for i, data in enumerate(slices):
            message = mridc_pb2.SliceDatagram(
                device_id=envelope.device_id, sequence=envelope.sequence, capture_time_us=envelope.capture_time_us,
                model_id=envelope.model_id, slice_index=i, slice_count=len(slices), slice=data,
                deadline_ms=int(self.deadline_s * 1000))
            out.append(sign(message, self.key).SerializeToString())
        too_big = [len(d) for d in out if len(d) + COAP_HEADER_BYTES > self.mtu]
        if too_big:
            self.stats["oversized"] += len(too_big)
            log.warning("%s: frame %d has %d datagram(s) over the %d-byte MTU (largest %d): encode with "
                        "--slice-bytes %d or less", self.device_id, envelope.sequence, len(too_big), self.mtu,
                        max(too_big) + COAP_HEADER_BYTES, self.max_slice_bytes)
        return out

    async def _post(self, path: str, payload: bytes, *, no_response: bool):
        import aiocoap

        message = aiocoap.Message(code=aiocoap.POST, uri=f"{self.uri}/{path}", payload=payload,
                                  transport_tuning=aiocoap.Unreliable)
        if no_response:
            message.opt.no_response = 26  # RFC 7967: suppress 2.xx, 4.xx and 5.xx answers
        request = self._context.request(message, handle_blockwise=False)
        request.response.add_done_callback(_retrieve)  # an exchange still open at close() ends in an error
        return request

    async def _send_slices(self, datagrams: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        for payload in datagrams:
            request = await self._post(COAP_SLICE_PATH, payload, no_response=True)
            # No answer ever comes (No-Response): drop the exchange once the datagram is surely out.
            loop.call_later(1.0, request.response.cancel)
            self.stats["bytes_sent"] += len(payload)
            if self.pace_s:
                await asyncio.sleep(self.pace_s)

    async def _query(self, sequence: int) -> mridc_pb2.SliceReport | None:
        nonce = os.urandom(4)
        query = sign(mridc_pb2.SliceQuery(device_id=self.device_id, sequence=sequence, nonce=nonce), self.key)
        self.stats["queries"] += 1
        request = await self._post(COAP_QUERY_PATH, query.SerializeToString(), no_response=False)
        try:
            response = await asyncio.wait_for(request.response, self.query_timeout_s)
        except TimeoutError:
            self.stats["query_timeouts"] += 1
            return None
        except Exception as exc:  # noqa: BLE001 (aiocoap errors: unreachable, reset)
            self.stats["query_timeouts"] += 1
            log.debug("%s: query for %d failed: %s", self.device_id, sequence, exc)
            await asyncio.sleep(self.query_timeout_s)
            return None
        report = mridc_pb2.SliceReport()
        try:
            report.ParseFromString(response.payload)
        except Exception:  # noqa: BLE001 (protobuf DecodeError)
            report = None
        if report is None or report.nonce != nonce or report.sequence != sequence or not (
                self.key is None or verify(report, self.key)):
            self.stats["bad_reports"] += 1
            log.warning("%s: dropped a report for frame %d that is not authentic (code %s)", self.device_id,
                        sequence, response.code)
            return None
        return report

    async def _deliver(self, envelope: mridc_pb2.FrameEnvelope) -> None:
        """Send a frame's slices, then ask and resend until the cloud holds all (or stored what it got)."""
        try:
            await self._deliver_frame(envelope)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivering frame %d failed", self.device_id, envelope.sequence)
        finally:
            self._tasks.pop(envelope.sequence, None)

    async def _deliver_frame(self, envelope: mridc_pb2.FrameEnvelope) -> None:
        datagrams = self._datagrams(envelope)
        count = len(datagrams)
        started = time.monotonic()
        missing = set(range(count))
        first = True
        last_heard = started
        while not self._stopping:
            now = time.monotonic()
            if missing and (first or (self.retransmit and now - started < self.resend_window_s)):
                await self._send_slices([datagrams[i] for i in sorted(missing)])
                self.stats["slices_sent"] += len(missing)
                sent = self.slices_sent_by_sequence
                sent[envelope.sequence] = sent.pop(envelope.sequence, 0) + len(missing)
                if len(sent) > 1024:
                    del sent[next(iter(sent))]
                if not first:
                    self.stats["slices_resent"] += len(missing)
                first = False
            await asyncio.sleep(self.query_interval_s)
            report = await self._query(envelope.sequence)
            now = time.monotonic()
            if report is None:
                if now - last_heard > self.give_up_s + self.deadline_s:
                    log.info("%s: no report on frame %d for %.0f s; the queue will send it again", self.device_id,
                             envelope.sequence, now - last_heard)
                    return
                continue
            last_heard = now
            if report.slice_count == count:
                held = bitmap_indexes(report.received, count)
            else:  # nothing known yet (0), or the frame came whole some other way (1)
                held = set(range(count)) if report.slice_count == 1 and is_final(report.status) else set()
            missing = set(range(count)) - held
            if is_final(report.status) and (not missing or not self.retransmit
                                            or now - started >= self.resend_window_s):
                self._deliver_ack(build_ack(self.device_id, envelope.sequence, report.status, report.reason))
                return
            if not self.retransmit:
                missing = set()
                if report.slice_count == 0 and now - started > self.deadline_s + self.give_up_s:
                    self.stats["frames_lost"] += 1
                    log.warning("%s: frame %d lost on the link (no slice arrived; retransmission is off)",
                                self.device_id, envelope.sequence)
                    self._deliver_ack(build_ack(self.device_id, envelope.sequence, AckStatus.REJECTED,
                                                "lost on the link: no slice arrived and retransmission is off"))
                    return
