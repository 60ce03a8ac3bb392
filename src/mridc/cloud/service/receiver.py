"""A minimal cloud receiver, for tests, benchmarks and the simulator: no decoding, no store.

It takes frames from a broker (``MqttReceiver``) or a ``FrameIngest.Upload`` stream (``GrpcReceiver``),
checks each content hash, dedupes by (device, sequence), answers a ``FrameAck`` and records what came:
``deliveries`` (every arrival, duplicates included), ``frames`` (deduped bitstreams), ``bad`` (problems)
and ``arrivals`` (a queue of (monotonic arrival time, envelope), for timing). The production service is
``worker.py`` + ``ingest_*.py``; this one keeps edge tests and link benchmarks independent of it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable

from mridc.shared.protocol import AckStatus, Channel, TopicError, acks_topic, build_ack, topic_filter
from mridc.v1 import mridc_pb2

# envelope -> the ack status to answer, or None to answer nothing (default: STORED, DUPLICATE when seen)
Decide = Callable[[mridc_pb2.FrameEnvelope], int | None]


class AckingReceiver:
    """The transport-independent part: check, dedupe, decide, record."""

    def __init__(self, decide: Decide | None = None) -> None:
        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, int]] = []
        self.frames: dict[tuple[str, int], bytes] = {}
        self.bad: list[str] = []
        self.arrivals: queue.Queue[tuple[float, mridc_pb2.FrameEnvelope]] = queue.Queue()
        self.decide = decide

    def handle(self, envelope: mridc_pb2.FrameEnvelope) -> mridc_pb2.FrameAck | None:
        """Record one frame; the ack to send back (None: send none)."""
        key = (envelope.device_id, envelope.sequence)
        with self.lock:
            self.deliveries.append(key)
            if hashlib.sha256(envelope.bitstream).digest() != envelope.content_hash:
                self.bad.append(f"{key}: hash mismatch")
                status = AckStatus.REJECTED
            elif self.decide is not None:
                status = self.decide(envelope)
            else:
                status = AckStatus.DUPLICATE if key in self.frames else AckStatus.STORED
            if status in (AckStatus.STORED, AckStatus.DUPLICATE):
                self.frames.setdefault(key, envelope.bitstream)
        if status is None:
            return None
        return build_ack(envelope.device_id, envelope.sequence, status)

    def next_arrival(self, timeout: float) -> tuple[float, mridc_pb2.FrameEnvelope]:
        """The next frame that arrived, with its monotonic arrival time; queue.Empty after ``timeout``."""
        return self.arrivals.get(timeout=timeout)

    def wait_for(self, keys: Iterable[tuple[str, int]], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        wanted = set(keys)
        while time.monotonic() < deadline:
            with self.lock:
                if wanted <= set(self.frames):
                    return True
            time.sleep(0.05)
        return False

    def sequences(self, device_id: str) -> list[int]:
        with self.lock:
            return sorted(seq for dev, seq in self.frames if dev == device_id)


class MqttReceiver(AckingReceiver):
    """Subscribes to every device's frames topic (QoS 1) and acks on the device's acks topic.

    ``session_expiry_s``: a persistent session (clean_start=False) that outlives a disconnect, so frames
    published meanwhile are delivered on reconnect; None connects with paho's defaults (clean first start,
    session ends at disconnect). ``send_acks=False`` only listens (a link benchmark that must not put ack
    traffic on the link it measures).
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", client_id: str = "mridc-test-cloud", tls=None,
                 username: str | None = None, password: str | None = None, decide: Decide | None = None,
                 send_acks: bool = True, session_expiry_s: int | None = 3600) -> None:
        super().__init__(decide)
        self.host, self.port, self.client_id = host, port, client_id
        self.tls, self.username, self.password = tls, username, password  # tls: edge TlsFiles or None
        self.send_acks = send_acks
        self.session_expiry_s = session_expiry_s
        self.client = None

    def start(self) -> MqttReceiver:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.tls is not None:
            client.tls_set(ca_certs=self.tls.ca_file, certfile=self.tls.cert_file, keyfile=self.tls.key_file)
        if self.username:
            client.username_pw_set(self.username, self.password)
        subscribed = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties):
            c.subscribe(topic_filter(Channel.FRAMES), qos=1)

        def on_message(c, userdata, message):
            arrived = time.monotonic()  # before parsing: benchmarks time the link up to here
            envelope = mridc_pb2.FrameEnvelope.FromString(message.payload)
            ack = self.handle(envelope)
            self.arrivals.put((arrived, envelope))
            if ack is None or not self.send_acks:
                return
            try:
                ack_topic = acks_topic(ack.device_id)
            except TopicError as exc:  # an envelope device id that cannot be a topic level: nowhere to ack
                with self.lock:
                    self.bad.append(str(exc))
                return
            c.publish(ack_topic, ack.SerializeToString(), qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = on_message
        if self.session_expiry_s is None:
            client.connect(self.host, self.port)
        else:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            client.connect(self.host, self.port, clean_start=False, properties=props)
        client.loop_start()
        if not subscribed.wait(10):
            client.loop_stop()
            raise RuntimeError(f"receiver could not subscribe at the broker {self.host}:{self.port}")
        self.client = client
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


class GrpcReceiver(AckingReceiver):
    """A ``FrameIngest`` server on 127.0.0.1; ``token`` enforces ``authorization: Bearer``; TLS optional."""

    def __init__(self, port: int = 0, *, token: str | None = None, tls_server: tuple[bytes, bytes] | None = None,
                 decide: Decide | None = None) -> None:
        super().__init__(decide)
        self.port, self.token, self.tls_server = port, token, tls_server  # tls_server: (key, cert) PEM bytes
        self.server = None

    def start(self) -> GrpcReceiver:
        from concurrent import futures

        import grpc

        from mridc.v1 import mridc_pb2_grpc

        receiver = self

        class Servicer(mridc_pb2_grpc.FrameIngestServicer):
            def Upload(self, request_iterator, context):
                if receiver.token is not None:
                    metadata = dict(context.invocation_metadata())
                    if metadata.get("authorization") != f"Bearer {receiver.token}":
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing device token")
                for envelope in request_iterator:
                    arrived = time.monotonic()
                    ack = receiver.handle(envelope)
                    receiver.arrivals.put((arrived, envelope))
                    if ack is not None:
                        yield ack

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
        ])
        mridc_pb2_grpc.add_FrameIngestServicer_to_server(Servicer(), server)
        address = f"127.0.0.1:{self.port}"
        if self.tls_server is not None:
            self.port = server.add_secure_port(address, grpc.ssl_server_credentials([self.tls_server]))
        else:
            self.port = server.add_insecure_port(address)
        server.start()
        self.server = server
        return self

    def stop(self, grace: float | None = 0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(5)
            self.server = None
