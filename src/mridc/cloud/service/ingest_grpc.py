"""gRPC ingest: FrameIngest.Upload (bidirectional stream, one FrameAck per frame), Decode, and the standard
gRPC health service.

Authentication: `authorization: Bearer <token>` metadata; the token names exactly one device and every
envelope on the stream must be that device's. Backpressure: the stream's reader blocks while the decode
queue is full (HTTP/2 flow control then slows the sender) and answers RETRY_LATER after
grpc_enqueue_timeout_s.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mridc.v1 import mridc_pb2, mridc_pb2_grpc

from .config import ServiceConfig
from .security import TokenAuthority, bearer_token
from .worker import DecodeService

log = logging.getLogger("mridc.cloud.service.grpc")

SERVICE_NAME = "mridc.v1.FrameIngest"
_END = object()


class FrameIngestServicer(mridc_pb2_grpc.FrameIngestServicer):
    def __init__(self, config: ServiceConfig, service: DecodeService, tokens: TokenAuthority | None):
        self.config = config
        self.service = service
        self.tokens = tokens

    def _authenticate(self, context) -> str | None:
        """The device this call is allowed to act as; None when tokens are off (allow_insecure)."""
        if self.tokens is None:
            return None
        device = self.tokens.device_for(bearer_token(context.invocation_metadata()))
        if device is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown device token")
        return device

    def Upload(self, request_iterator, context):
        device = self._authenticate(context)
        acks: queue.Queue = queue.Queue()
        submitted = [0]

        def read_requests() -> None:
            try:
                for envelope in request_iterator:
                    submitted[0] += 1
                    self.service.submit(envelope, "grpc", acks.put, authenticated_device=device,
                                        payload_bytes=envelope.ByteSize(),
                                        wait=self.config.grpc_enqueue_timeout_s)
            except grpc.RpcError:
                pass  # the client went away; queued frames still finish and are stored
            except Exception:
                log.exception("upload reader failed")
            finally:
                acks.put(_END)

        threading.Thread(target=read_requests, name="mridc-grpc-reader", daemon=True).start()
        sent, ended = 0, False
        while not (ended and sent >= submitted[0]):
            if not context.is_active():
                return
            try:
                item = acks.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is _END:
                ended = True
                continue
            sent += 1
            yield item

    def Decode(self, request, context):
        self._authenticate(context)
        if len(request.bitstream) > self.config.max_bitstream_bytes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bitstream too large")
        try:
            frame = self.service.decoder.validate(request.bitstream)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad bitstream: {exc}")
        start = time.monotonic()
        settings = self.service.decode_settings(realism=float(request.realism), seed=int(request.seed),
                                                steps=int(request.steps) or None)
        with self.service.decoder_lock:
            image = self.service.decoder.decode_frames([frame], settings)[0].image
        seconds = time.monotonic() - start
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        return mridc_pb2.DecodeResponse(png=buffer.getvalue(), width=image.shape[1], height=image.shape[0],
                                        decode_seconds=seconds)


class GrpcIngest:
    def __init__(self, config: ServiceConfig, service: DecodeService):
        self.config = config
        self.service = service
        tokens = TokenAuthority.from_file(config.grpc_tokens) if config.grpc_tokens else None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="mridc-grpc"),
                                  options=[("grpc.so_reuseport", 1),
                                           ("grpc.max_receive_message_length", config.max_payload_bytes + 1024),
                                           ("grpc.keepalive_permit_without_calls", 1),
                                           ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000)])
        mridc_pb2_grpc.add_FrameIngestServicer_to_server(FrameIngestServicer(config, service, tokens), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.grpc_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.grpc_key.read_bytes(), config.grpc_cert.read_bytes())],
                root_certificates=config.grpc_client_ca.read_bytes() if config.grpc_client_ca else None,
                require_client_auth=config.grpc_client_ca is not None)
            self.port = self.server.add_secure_port(config.grpc_addr, credentials)
        else:
            self.port = self.server.add_insecure_port(config.grpc_addr)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {config.grpc_addr}")

    def start(self) -> None:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
