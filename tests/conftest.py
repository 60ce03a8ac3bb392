"""Shared fixtures: free loopback ports, real mosquitto brokers, a throwaway PKI, link emulators.

- ``free_port``: an int, a TCP port on 127.0.0.1 that was free a moment ago.
- ``mosquitto``: a running ``MosquittoBroker`` (anonymous, persistence on, so ``restart()`` keeps
  sessions); ``.port``, ``.url``, ``.restart(down_for=...)``, ``.stop()``, ``.log_tail()``.
- ``mosquitto_factory(**options)``: more brokers with TLS / password file / ACL (see
  ``firmware_sim/broker.py``); all are stopped at teardown.
- ``test_pki``: CA + server cert for 127.0.0.1/localhost + client certs ``cam-01``, ``cam-02``,
  ``cloud`` (session scope; ``firmware_sim/certs.py``).
- ``link_factory(upstream_port, **options)``: a started ``LinkEmulator`` in front of a port
  (``firmware_sim/link.py``); ``.port`` is where clients connect. Stopped at teardown.
- ``mqtt_cloud_factory(broker_port, **options)`` / ``grpc_cloud_factory(port=0, token=..., tls_server=...)``:
  minimal real receivers (a paho subscriber / a FrameIngest server) that check the content hash,
  dedupe by (device, sequence), ack, and record ``.deliveries`` (all) and ``.frames`` (deduped).

Imports are inside the fixtures, so a test module that uses none of them never pays for them.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def free_port() -> int:
    from mridc.firmware_sim.broker import free_port as _free_port

    return _free_port()


def _require_mosquitto() -> None:
    if shutil.which("mosquitto") is None and not any(
        shutil.which(p) for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
    ):
        import os

        if os.environ.get("MRIDC_REQUIRE_MOSQUITTO") == "1":  # `make test` installs it: missing is a failure
            pytest.fail("mosquitto is not installed (Debian package 'mosquitto'); run `make setup` as root")
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")


@pytest.fixture
def mosquitto_factory():
    _require_mosquitto()
    from mridc.firmware_sim.broker import MosquittoBroker

    brokers = []

    def _make(**options) -> MosquittoBroker:
        broker = MosquittoBroker(**options).start()
        brokers.append(broker)
        return broker

    yield _make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory):
    return mosquitto_factory(persistence=True)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from mridc.firmware_sim.certs import generate_test_pki

    return generate_test_pki(tmp_path_factory.mktemp("pki"), clients=("cam-01", "cam-02", "cloud"))


@pytest.fixture
def link_factory():
    from mridc.firmware_sim.link import LinkEmulator

    links = []

    def _make(upstream_port: int, **options) -> LinkEmulator:
        link = LinkEmulator(("127.0.0.1", upstream_port), **options).start()
        links.append(link)
        return link

    yield _make
    for link in links:
        link.stop()


# -- minimal in-test cloud receivers -----------------------------------------------------------------
# A real subscriber / a real gRPC server that validate, dedupe by (device, sequence) and ack. The
# production service is cloud/service/; these keep edge tests independent of it.


class _Receiver:
    def __init__(self, decide=None) -> None:
        import threading

        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, int]] = []  # every arrival, duplicates included
        self.frames: dict[tuple[str, int], bytes] = {}  # deduped: (device, sequence) -> bitstream
        self.bad: list[str] = []
        # optional callable(envelope) -> FrameAck.Status, or None for "no ack at all" (default: STORED/DUPLICATE)
        self.decide = decide

    def handle(self, envelope):
        import hashlib

        from mridc.v1 import mridc_pb2

        key = (envelope.device_id, envelope.sequence)
        with self.lock:
            self.deliveries.append(key)
            if hashlib.sha256(envelope.bitstream).digest() != envelope.content_hash:
                self.bad.append(f"{key}: hash mismatch")
                status = mridc_pb2.FrameAck.REJECTED
            elif self.decide is not None:
                status = self.decide(envelope)
            else:
                status = mridc_pb2.FrameAck.DUPLICATE if key in self.frames else mridc_pb2.FrameAck.STORED
            if status in (mridc_pb2.FrameAck.STORED, mridc_pb2.FrameAck.DUPLICATE):
                self.frames.setdefault(key, envelope.bitstream)
        if status is None:
            return None
        return mridc_pb2.FrameAck(device_id=envelope.device_id, sequence=envelope.sequence, status=status)

    def wait_for(self, keys, timeout: float = 30.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if set(keys) <= set(self.frames):
                    return True
            time.sleep(0.05)
        return False

    def sequences(self, device_id: str) -> list[int]:
        with self.lock:
            return sorted(seq for dev, seq in self.frames if dev == device_id)


class MqttAckingCloud(_Receiver):
    """Subscribes to ``mridc/v1/+/frames`` (QoS 1, persistent session) and acks on ``.../acks``."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", client_id: str = "mridc-test-cloud", tls=None,
                 username=None, password=None, decide=None) -> None:
        super().__init__(decide)
        import paho.mqtt.client as mqtt

        self.host, self.port, self.client_id = host, port, client_id
        self.tls, self.username, self.password = tls, username, password
        self._mqtt = mqtt
        self.client = None

    def start(self) -> MqttAckingCloud:
        import threading

        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from mridc.v1 import mridc_pb2

        mqtt = self._mqtt
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.tls is not None:
            client.tls_set(ca_certs=self.tls.ca_file, certfile=self.tls.cert_file, keyfile=self.tls.key_file)
        if self.username:
            client.username_pw_set(self.username, self.password)
        subscribed = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties):
            c.subscribe("mridc/v1/+/frames", qos=1)

        def on_message(c, userdata, message):
            ack = self.handle(mridc_pb2.FrameEnvelope.FromString(message.payload))
            if ack is not None:
                c.publish(f"mridc/v1/{ack.device_id}/acks", ack.SerializeToString(), qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect(self.host, self.port, clean_start=False, properties=props)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("test cloud could not subscribe")
        self.client = client
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


class GrpcAckingCloud(_Receiver):
    """A ``FrameIngest`` server on 127.0.0.1; ``token`` enforces ``authorization: Bearer``; TLS optional."""

    def __init__(self, port: int = 0, *, token=None, tls_server=None, decide=None) -> None:
        super().__init__(decide)
        self.port, self.token, self.tls_server = port, token, tls_server  # tls_server: (cert, key) bytes
        self.server = None

    def start(self) -> GrpcAckingCloud:
        from concurrent import futures

        import grpc

        from mridc.v1 import mridc_pb2_grpc

        cloud = self

        class Servicer(mridc_pb2_grpc.FrameIngestServicer):
            def Upload(self, request_iterator, context):
                if cloud.token is not None:
                    metadata = dict(context.invocation_metadata())
                    if metadata.get("authorization") != f"Bearer {cloud.token}":
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing device token")
                for envelope in request_iterator:
                    ack = cloud.handle(envelope)
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
            creds = grpc.ssl_server_credentials([self.tls_server])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        server.start()
        self.server = server
        return self

    def stop(self, grace: float | None = 0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(5)
            self.server = None


@pytest.fixture
def mqtt_cloud_factory():
    clouds = []

    def _make(port: int, **options) -> MqttAckingCloud:
        cloud = MqttAckingCloud(port, **options).start()
        clouds.append(cloud)
        return cloud

    yield _make
    for cloud in clouds:
        cloud.stop()


@pytest.fixture
def grpc_cloud_factory():
    clouds = []

    def _make(port: int = 0, **options) -> GrpcAckingCloud:
        cloud = GrpcAckingCloud(port, **options).start()
        clouds.append(cloud)
        return cloud

    yield _make
    for cloud in clouds:
        cloud.stop()
