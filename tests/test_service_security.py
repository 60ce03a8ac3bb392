"""Broker-side security with a real mosquitto: TLS, generated password file and ACL, and per-device tokens."""

from __future__ import annotations

import queue
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from mridc.cloud.service.security import (
    TokenAuthority,
    bearer_token,
    mosquitto_acl,
    mosquitto_password_hash,
    new_token,
    write_acl_file,
    write_password_file,
    write_token_file,
)
from mridc.lab.broker import BrokerTls, MosquittoBroker
from mridc.lab.certs import generate_test_pki

pytestmark = pytest.mark.net

PASSWORDS = {"mridc-cloud": "cloud-secret", "cam-a": "a-secret", "cam-b": "b-secret"}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure-broker")
    pki = generate_test_pki(tmp / "pki")
    password_file = write_password_file(tmp / "passwords", PASSWORDS)
    acl_file = write_acl_file(tmp / "acl")
    with MosquittoBroker(tls=BrokerTls(str(pki.ca_cert), str(pki.server_cert), str(pki.server_key)),
                         password_file=password_file, acl_file=acl_file) as broker:
        yield broker, pki


class Client:
    """A paho MQTT 5 client that records what it receives."""

    def __init__(self, broker, pki, user, password, *, tls=True):
        self.messages: queue.Queue = queue.Queue()
        self.connect_rc: queue.Queue = queue.Queue()
        self.pubacks: dict[int, object] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(ca_certs=str(pki.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = lambda c, u, f, rc, p: self.connect_rc.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.rc = self.connect_rc.get(timeout=10)

    def subscribe(self, topic):
        result, _mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.3)

    def publish(self, topic, payload):
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        time.sleep(0.05)
        return self.pubacks.get(info.mid)

    def received(self, wait=0.7):
        deadline, got = time.monotonic() + wait, []
        while time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=0.05))
            except queue.Empty:
                pass
        return got

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_password_hash_format_matches_mosquitto():
    hashed = mosquitto_password_hash("pw", salt=b"0123456789ab")
    assert hashed.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and len(hashed.split("$")[-1]) == 88


def test_acl_confines_devices_to_their_own_topics():
    acl = mosquitto_acl(["svc"])
    assert "pattern write mridc/v1/%u/frames" in acl and "pattern read mridc/v1/%u/acks" in acl
    assert "user svc\ntopic read mridc/v1/+/frames" in acl


def test_wrong_password_and_plain_tcp_are_refused(secure_broker):
    broker, pki = secure_broker
    bad = Client(broker, pki, "cam-a", "wrong")
    assert bad.rc.is_failure
    bad.close()
    plain = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set("cam-a", PASSWORDS["cam-a"])
    plain.connect("127.0.0.1", broker.port)  # TCP connects; the TLS listener then drops the plain CONNECT
    for _ in range(20):
        plain.loop(timeout=0.1)
    assert not plain.is_connected()


def test_forged_device_cannot_publish_or_read_another_devices_topics(secure_broker):
    broker, pki = secure_broker
    cloud = Client(broker, pki, "mridc-cloud", PASSWORDS["mridc-cloud"])
    cam_a = Client(broker, pki, "cam-a", PASSWORDS["cam-a"])
    cam_b = Client(broker, pki, "cam-b", PASSWORDS["cam-b"])
    try:
        assert not (cloud.rc.is_failure or cam_a.rc.is_failure or cam_b.rc.is_failure)
        cloud.subscribe("$share/mridc-decoders/mridc/v1/+/frames")
        cam_b.subscribe("mridc/v1/+/acks")  # cam-b tries to read everyone's acks
        cam_b.subscribe("mridc/v1/cam-a/frames")  # ... and cam-a's frames
        cam_a.subscribe("mridc/v1/cam-a/acks")

        rc = cam_b.publish("mridc/v1/cam-a/frames", b"forged by cam-b")
        assert rc is not None and rc.is_failure  # MQTT 5 PUBACK: not authorized
        cam_a.publish("mridc/v1/cam-a/frames", b"genuine")
        assert cloud.received() == [("mridc/v1/cam-a/frames", b"genuine")]
        assert cam_b.received(0.2) == []

        cloud.publish("mridc/v1/cam-a/acks", b"ack for a")
        assert cam_a.received() == [("mridc/v1/cam-a/acks", b"ack for a")]
        assert cam_b.received(0.3) == []
        # A device cannot impersonate the cloud either: acks are written by the service user only.
        assert cam_b.publish("mridc/v1/cam-a/acks", b"fake ack").is_failure
        assert cam_a.received(0.3) == []
    finally:
        for client in (cloud, cam_a, cam_b):
            client.close()


def test_grpc_tokens_name_exactly_one_device(tmp_path):
    tokens = {"cam-a": new_token(), "cam-b": new_token()}
    path = write_token_file(tmp_path / "tokens.json", tokens)
    assert tokens["cam-a"] not in path.read_text()  # only digests on disk
    authority = TokenAuthority.from_file(path)
    assert authority.device_for(tokens["cam-a"]) == "cam-a"
    assert authority.device_for(tokens["cam-b"]) == "cam-b"
    assert authority.device_for("guess") is None and authority.device_for(None) is None
    assert bearer_token([("authorization", f"Bearer {tokens['cam-a']}")]) == tokens["cam-a"]
    assert bearer_token([("x-other", "1")]) is None


def test_provision_cli_writes_broker_and_grpc_files(tmp_path):
    import json
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "mridc.cloud.service.security", "--out", str(tmp_path), "--device",
                    "cam-01", "--device", "cam-02"], check=True, capture_output=True)
    secrets = json.loads((tmp_path / "secrets.json").read_text())
    assert set(secrets["mqtt_passwords"]) == {"mridc-cloud", "cam-01", "cam-02"}
    assert TokenAuthority.from_file(tmp_path / "grpc_tokens.json").device_for(
        secrets["grpc_tokens"]["cam-02"]) == "cam-02"
    users = [line.split(":")[0] for line in (tmp_path / "passwords").read_text().splitlines()]
    assert sorted(users) == ["cam-01", "cam-02", "mridc-cloud"]
    assert "pattern write mridc/v1/%u/frames" in (tmp_path / "acl").read_text()
