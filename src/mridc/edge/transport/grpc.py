"""gRPC transport: the device side of ``FrameIngest.Upload`` (a bidirectional stream).

Frames go up the request stream as they are handed over; per-frame ``FrameAck`` messages come back
on the response stream. The device authenticates with ``authorization: Bearer <token>`` metadata
(per-device token) over TLS (``grpcs://``) or, on trusted networks and in tests, plaintext.

Deadlines: the channel must become ready within ``connect_deadline_s``; each stream lives at most
``stream_lifetime_s`` and is then reopened (frames without an ack are resent; the cloud dedupes).
Keepalive pings (``keepalive_s``) detect a dead link while no data flows. The server must allow
them: ``grpc.http2.min_recv_ping_interval_without_data_ms`` <= ``keepalive_s`` * 1000 and
``grpc.keepalive_permit_without_calls`` = 1, or it answers with GOAWAY "too_many_pings".
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import grpc

from mridc.edge.transport.base import Backoff, TlsFiles, Transport
from mridc.v1 import mridc_pb2, mridc_pb2_grpc

log = logging.getLogger("mridc.edge.grpc")

_END_OF_STREAM = object()
_FATAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class GrpcTransport(Transport):
    scheme = "grpc"

    def __init__(
        self,
        target: str,
        device_id: str,
        *,
        token: str | None = None,
        tls: TlsFiles | None = None,
        connect_deadline_s: float = 10.0,
        stream_lifetime_s: float = 3600.0,
        keepalive_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        backoff: Backoff | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        super().__init__(device_id)
        self.target = target
        self.token = token
        self.tls = tls
        self.connect_deadline_s = connect_deadline_s
        self.stream_lifetime_s = stream_lifetime_s
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.options = [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Our loop owns the retry schedule; keep gRPC's own subchannel backoff short.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls is not None:
            self.scheme = "grpcs"
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca_file),
                private_key=_read(tls.key_file),
                certificate_chain=_read(tls.cert_file),
            )
        else:
            self._credentials = None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outbox: queue.Queue | None = None
        self._call = None
        self._lock = threading.Lock()
        self.last_error: str = ""

    def _channel(self) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=self.options)
        return grpc.insecure_channel(self.target, options=self.options)

    def _run(self) -> None:
        while not self._stop.is_set():
            channel = self._channel()
            try:
                grpc.channel_ready_future(channel).result(timeout=self.connect_deadline_s)
            except grpc.FutureTimeoutError:
                channel.close()
                delay = self.backoff.next_delay()
                self.last_error = f"{self.target} not ready within {self.connect_deadline_s} s"
                log.info("%s: %s; retry in %.1f s", self.device_id, self.last_error, delay)
                self._stop.wait(delay)
                continue
            self._stream(channel)
            channel.close()
            if not self._stop.is_set():
                delay = self.backoff.next_delay()
                log.info("%s: reopening the upload stream in %.1f s", self.device_id, delay)
                self._stop.wait(delay)

    def _stream(self, channel: grpc.Channel) -> None:
        outbox: queue.Queue = queue.Queue()
        stub = mridc_pb2_grpc.FrameIngestStub(channel)
        call = stub.Upload(iter(outbox.get, _END_OF_STREAM), metadata=self._metadata,
                           timeout=self.stream_lifetime_s)
        with self._lock:
            self._outbox, self._call = outbox, call
        self.stats["connects"] += 1
        self._connected.set()
        log.info("%s: upload stream open to %s", self.device_id, self.target)
        opened = time.monotonic()
        try:
            for ack in call:
                if ack.device_id and ack.device_id != self.device_id:
                    log.warning("%s: ignoring ack addressed to %s", self.device_id, ack.device_id)
                    continue
                self.backoff.reset()
                self._deliver_ack(ack)
            log.info("%s: server closed the upload stream", self.device_id)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            self.last_error = f"{code}: {exc.details() if hasattr(exc, 'details') else exc}"
            if code == grpc.StatusCode.CANCELLED and self._stop.is_set():
                pass
            elif code in _FATAL_CODES:
                log.error("%s: server refused the device: %s (check the token)", self.device_id, self.last_error)
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                log.info("%s: stream reached its %.0f s lifetime; reopening", self.device_id, self.stream_lifetime_s)
                self.backoff.reset()
            else:
                log.warning("%s: upload stream broke: %s", self.device_id, self.last_error)
        finally:
            with self._lock:
                self._outbox, self._call = None, None
            outbox.put(_END_OF_STREAM)
            self._connected.clear()
            self.stats["disconnects"] += 1
            if time.monotonic() - opened > 5.0:
                self.backoff.reset()
            if self.on_reset is not None:
                self.on_reset()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"grpc-{self.device_id}", daemon=True)
            self._thread.start()

    def send(self, envelope: mridc_pb2.FrameEnvelope) -> bool:
        with self._lock:
            outbox = self._outbox
        if outbox is None or not self._connected.is_set():
            return False
        outbox.put(envelope)
        self.stats["frames_sent"] += 1
        self.stats["bytes_sent"] += envelope.ByteSize()
        return True

    def close(self, timeout: float = 3.0) -> None:
        self._stop.set()
        with self._lock:
            outbox, call = self._outbox, self._call
        if outbox is not None:
            outbox.put(_END_OF_STREAM)  # half-close: the server may still send the last acks
        if self._thread is not None:
            self._thread.join(min(timeout, 1.0))
            if self._thread.is_alive() and call is not None:
                call.cancel()
            self._thread.join(timeout)
            self._thread = None
        self._connected.clear()
