"""MQTT transport against a real mosquitto 2: QoS 1 frames, acks, heartbeat, last will, TLS, sessions."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from mridc.edge.agent import Forwarder
from mridc.edge.queue import FrameQueue
from mridc.edge.transport import Backoff, TlsFiles, TransportError, open_transport
from mridc.edge.transport.mqtt import MqttTransport
from mridc.lab.broker import BrokerTls, write_password_file
from mridc.lab.synthetic import SyntheticEncoder
from mridc.shared.bitstream import inspect
from mridc.shared.protocol import device_from_topic, status_topic

pytestmark = [pytest.mark.net, pytest.mark.timeout(60)]


def fill_queue(queue: FrameQueue, n: int, seed: int = 0) -> list[int]:
    encoder, rng = SyntheticEncoder(), np.random.default_rng(seed)
    sequences = []
    for _ in range(n):
        result = encoder.encode(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8), bpp=0.05)
        sequences.append(queue.put(result.bitstream, model_id=result.token_frame.model_id).sequence)
    return sequences


@contextlib.contextmanager
def forwarding(queue, transport, **options):
    forwarder = Forwarder(queue, transport, **options)
    stop = threading.Event()
    transport.start()
    thread = threading.Thread(target=forwarder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield forwarder
    finally:
        stop.set()
        thread.join(5)
        transport.close()


def wait_until(predicate, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def retained(port: int, topic: str, **tls) -> dict | None:
    """The retained message on ``topic`` as JSON (None if there is none)."""
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_until(lambda: bool(got), 3)
    client.disconnect()
    client.loop_stop()
    return json.loads(got[-1]) if got else None


def test_topics():
    assert device_from_topic("mridc/v1/cam-01/frames") == "cam-01"
    assert device_from_topic("other/v1/cam-01/frames") is None
    with pytest.raises(TransportError, match="scheme"):
        open_transport("http://127.0.0.1:1", "cam-01")
    with pytest.raises(TransportError, match="not a TLS URL"):
        open_transport("mqtt://127.0.0.1:1", "cam-01", tls=TlsFiles(ca_file="ca.crt"))


def test_frames_arrive_once_and_acks_empty_the_queue(tmp_path, mosquitto, mqtt_cloud_factory):
    cloud = mqtt_cloud_factory(mosquitto.port)
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    sequences = fill_queue(queue, 12)
    transport = open_transport(mosquitto.url, "cam-01")
    with forwarding(queue, transport, window=4, ack_timeout_s=10) as forwarder:
        assert wait_until(lambda: len(queue) == 0), f"queue still holds {len(queue)}: {forwarder.stats}"
    assert cloud.sequences("cam-01") == sequences
    assert not cloud.bad
    for bitstream in cloud.frames.values():
        assert inspect(bitstream)["model_id_hex"] == "53594e54"
    assert queue.stats()["acked_stored"] == 12


def test_heartbeat_is_retained_and_last_will_fires_when_the_link_dies(tmp_path, mosquitto, link_factory):
    link = link_factory(mosquitto.port)
    transport = MqttTransport("127.0.0.1", link.port, "cam-02", keepalive_s=5, backoff=Backoff(0.2, 1.0))
    transport.start()
    try:
        assert transport.wait_connected(10)
        transport.publish_status({"queue": {"depth": 0}})
        assert wait_until(lambda: (retained(mosquitto.port, status_topic("cam-02")) or {}).get("state") == "online", 5)
        link.set_down("drop")  # the broker sees the TCP connection reset: the will fires
        assert wait_until(lambda: (retained(mosquitto.port, status_topic("cam-02")) or {}).get("state") == "offline",
                          10)
        link.set_up()
        assert transport.wait_connected(10)  # reconnects by itself, with backoff
        assert transport.stats["connects"] >= 2
    finally:
        transport.close()
    # A clean shutdown says offline itself (a graceful disconnect does not fire the will).
    status = retained(mosquitto.port, status_topic("cam-02"))
    assert status["state"] == "offline" and status["reason"] == "shutdown"


def test_acks_published_while_the_device_was_away_arrive_on_reconnect(tmp_path, mosquitto, mqtt_cloud_factory):
    """Persistent session (clean_start=False + session expiry): the broker keeps the device's acks."""
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 3)
    hold = threading.Event()
    cloud = mqtt_cloud_factory(mosquitto.port)
    original = cloud.handle

    def slow_handle(envelope):
        hold.wait(10)  # ack only after the device has gone away
        return original(envelope)

    cloud.handle = slow_handle
    first = open_transport(mosquitto.url, "cam-01")
    with forwarding(queue, first, window=8, ack_timeout_s=60):
        assert wait_until(lambda: first.stats["frames_sent"] == 3)
        time.sleep(0.3)
    assert len(queue) == 3
    hold.set()  # the cloud now acks to mridc/v1/cam-01/acks while nobody is connected as cam-01
    assert wait_until(lambda: len(cloud.frames) == 3)
    second = open_transport(mosquitto.url, "cam-01")
    acks = []
    second.on_ack = acks.append
    second.start()
    try:
        assert wait_until(lambda: len(acks) == 3, 10), acks
    finally:
        second.close()


def test_tls_with_password_and_a_wrong_password_is_refused(tmp_path, test_pki, mosquitto_factory, mqtt_cloud_factory):
    passwords = write_password_file(tmp_path / "passwd", {"cam-01": "s3cret", "cloud": "cloudpw"})
    broker = mosquitto_factory(
        tls=BrokerTls(str(test_pki.ca_cert), str(test_pki.server_cert), str(test_pki.server_key)),
        password_file=passwords,
    )
    tls = TlsFiles(ca_file=str(test_pki.ca_cert))
    cloud = mqtt_cloud_factory(broker.port, tls=tls, username="cloud", password="cloudpw")
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 3)
    transport = open_transport(broker.url, "cam-01", username="cam-01", password="s3cret", tls=tls)
    assert broker.url.startswith("mqtts://")
    with forwarding(queue, transport):
        assert wait_until(lambda: len(queue) == 0)
    assert cloud.sequences("cam-01") == [1, 2, 3]

    intruder = open_transport(broker.url, "cam-01", username="cam-01", password="wrong", tls=tls,
                              backoff=Backoff(0.2, 0.5))
    intruder.start()
    try:
        assert not intruder.wait_connected(1.5)
    finally:
        intruder.close()
