"""Real mosquitto (TLS, passwords, ACL) + real service processes over MQTT 5 shared subscriptions."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from service_helpers import MqttDevice, ServiceProcess, make_envelope, stored_events

from mridc.cloud.service.security import write_acl_file, write_password_file
from mridc.cloud.service.store import FrameStore
from mridc.lab.broker import BrokerTls, MosquittoBroker
from mridc.lab.certs import generate_test_pki
from mridc.v1 import mridc_pb2

pytestmark = pytest.mark.net
Ack = mridc_pb2.FrameAck
DEVICES = [f"cam-{i}" for i in range(4)]
PASSWORDS = {"mridc-cloud": "cloud-pw", "cam-x": "x-pw", **{d: f"{d}-pw" for d in DEVICES}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return generate_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def broker(tmp_path, pki):
    password_file = write_password_file(tmp_path / "passwords", PASSWORDS)
    acl_file = write_acl_file(tmp_path / "acl")
    with MosquittoBroker(tls=BrokerTls(str(pki.ca_cert), str(pki.server_cert), str(pki.server_key)),
                         password_file=password_file, acl_file=acl_file) as running:
        yield running


def serve_args(broker, pki, out, *extra):
    return ["--mqtt", broker.url, "--mqtt-ca", str(pki.ca_cert), "--mqtt-username", "mridc-cloud",
            "--out", str(out), "--decoder", "service_helpers:make_test_decoder", "--rate-limit", "0", *extra]


SERVICE_ENV = {"MRIDC_MQTT_PASSWORD": PASSWORDS["mridc-cloud"]}


def test_three_workers_share_the_stream_and_a_killed_one_loses_nothing(tmp_path, broker, pki):
    frames_per_device = 30
    total = frames_per_device * len(DEVICES)
    log_path = tmp_path / "service.log"
    service = ServiceProcess(serve_args(broker, pki, tmp_path / "out", "--workers", "3", "--worker-id", "dec",
                                        "--queue-size", "4", "--batch-size", "2"),
                             env={**SERVICE_ENV, "MRIDC_TEST_DECODE_DELAY_S": "0.05"}, log_path=log_path,
                             wait_ready=False)
    devices = []
    try:
        readies = service.wait_ready(3, timeout=40)
        assert all(r["mqtt_subscribed"] for r in readies)
        devices = [MqttDevice(broker.port, d, PASSWORDS[d], pki.ca_cert) for d in DEVICES]
        victim = readies[1]
        for seq in range(1, frames_per_device + 1):
            for device in devices:
                device.send(seq)
            if seq == frames_per_device // 3:
                # Decoding is slower than sending: every worker now holds unacked messages.
                killed_at = time.time()
                os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(0.02)
        for device in devices:
            device.wait_acks(frames_per_device, timeout=60)
        restarted = service.wait_ready(4, timeout=30)[3]
        assert restarted["worker_id"] == victim["worker_id"] and restarted["pid"] != victim["pid"]

        store = FrameStore(tmp_path / "out")
        rows = store.query()
        store.close()
        assert len(rows) == total
        assert len({(r["device_id"], r["sequence"]) for r in rows}) == total
        events = stored_events(log_path)
        decoded = collections.Counter((e["device"], e["sequence"]) for e in events)
        assert len(decoded) == total and set(decoded.values()) == {1}, "a frame was decoded twice"
        workers = collections.Counter(e["worker_id"] for e in events)
        assert len(workers) == 3 and min(workers.values()) > 0, workers  # the load was shared
        # The restarted slot got back frames that were sent to the victim before it died.
        assert any(e["worker_id"] == victim["worker_id"] and e["ts"] > killed_at
                   and e["sequence"] <= frames_per_device // 3 for e in events)
        assert len(list((tmp_path / "out" / "frames").rglob("*[0-9].png"))) == total
        for device in devices:
            by_seq = device.acks_by_sequence()
            assert set(by_seq) == set(range(1, frames_per_device + 1))
            statuses = {a.status for acks in by_seq.values() for a in acks}
            assert statuses <= {Ack.STORED, Ack.DUPLICATE}, statuses
    finally:
        for device in devices:
            device.close()
        assert service.terminate() == 0


def completed_decodes(log_path) -> collections.Counter:
    """(device, sequence) -> decodes that finished, stored or discarded, over every process's log."""
    counts: collections.Counter = collections.Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if data.get("msg") in ("frame stored", "decode discarded"):
            counts[(data["device"], data["sequence"])] += 1
    return counts


def test_independent_serve_processes_decode_each_frame_once(tmp_path, broker, pki):
    """Three `serve` processes with default worker ids on one host, one killed with SIGKILL and not restarted.

    The devices resend a frame that has no ack after a few seconds, as the edge agent does after its
    `ack_timeout_s`: that, not a restart, recovers what the dead process held (mosquitto #2662)."""
    devices_ids, frames_per_device = DEVICES[:3], 4
    total = len(devices_ids) * frames_per_device
    log_path = tmp_path / "service.log"
    env = {**SERVICE_ENV, "MRIDC_TEST_DECODE_DELAY_S": "0.4"}
    services = [ServiceProcess(serve_args(broker, pki, tmp_path / "out", "--queue-size", "2", "--batch-size", "1"),
                               env=env, log_path=log_path, timeout=40) for _ in range(3)]
    devices = []
    try:
        ids = [s.ready["worker_id"] for s in services]
        assert len(set(ids)) == 3 and all(s.ready["mqtt_subscribed"] for s in services), ids
        devices = [MqttDevice(broker.port, d, PASSWORDS[d], pki.ca_cert) for d in devices_ids]
        for seq in range(1, frames_per_device + 1):
            for device in devices:
                device.send(seq)
        time.sleep(0.6)  # every process now holds frames it has not acked
        victim = services[1]
        os.kill(victim.ready["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pending = [(d, q) for d in devices for q in range(1, frames_per_device + 1)
                       if q not in d.acks_by_sequence()]
            if not pending:
                break
            for device, seq in pending:  # the agent's ack timeout, shortened
                device.send(seq)
            time.sleep(4.0)
        assert not pending, f"never acked: {[(d.device_id, q) for d, q in pending]}"

        store = FrameStore(tmp_path / "out")
        rows = store.query()
        store.close()
        assert len(rows) == total == len({(r["device_id"], r["sequence"]) for r in rows})
        decodes = completed_decodes(log_path)
        assert len(decodes) == total and set(decodes.values()) == {1}, f"decoded more than once: {decodes}"
        assert "decode discarded" not in log_path.read_text()
        assert collections.Counter(e["worker_id"] for e in stored_events(log_path)).keys() <= set(ids)
        for device in devices:
            statuses = {a.status for acks in device.acks_by_sequence().values() for a in acks}
            assert statuses <= {Ack.STORED, Ack.DUPLICATE, Ack.RETRY_LATER}, statuses

        # A fourth process under a live process's id is refused with a message naming the holder.
        taken = services[0].ready["worker_id"]
        clash = ServiceProcess(serve_args(broker, pki, tmp_path / "out", "--worker-id", taken), env=env,
                               log_path=tmp_path / "clash.log", wait_ready=False)
        assert clash.proc.wait(40) == 2
        assert "is in use by a live instance" in (tmp_path / "clash.log").read_text()
        clash.close()
    finally:
        for device in devices:
            device.close()
        for service in services:
            if service is not services[1]:
                assert service.terminate() == 0
            service.close()


def test_consumers_get_the_preview_then_the_refined_picture(tmp_path, broker, pki):
    import ssl

    import paho.mqtt.client as mqtt

    from mridc.shared.protocol import Channel, topic_filter

    events, got = [], threading.Event()
    consumer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="consumer", protocol=mqtt.MQTTv5)
    consumer.username_pw_set("mridc-cloud", PASSWORDS["mridc-cloud"])
    consumer.tls_set(ca_certs=str(pki.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    consumer.on_connect = lambda c, u, f, rc, p: c.subscribe([(topic_filter(Channel.PREVIEW), 1),
                                                              (topic_filter(Channel.REFINED), 1)])
    consumer.on_subscribe = lambda *a: got.set()
    consumer.on_message = lambda c, u, m: events.append((m.topic, json.loads(m.payload)))
    consumer.connect("127.0.0.1", broker.port)
    consumer.loop_start()
    assert got.wait(10)
    service = ServiceProcess(serve_args(broker, pki, tmp_path / "out", "--refine-realism", "0.5"),
                             env={**SERVICE_ENV, "MRIDC_TEST_DECODE_DELAY_S": "0.1"}, log_path=tmp_path / "log")
    device = MqttDevice(broker.port, "cam-0", PASSWORDS["cam-0"], pki.ca_cert)
    try:
        for seq in (1, 2, 3):
            device.send(seq)
        device.wait_acks(3)
        deadline = time.monotonic() + 20
        while len(events) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(events) == 6, events
        for seq in (1, 2, 3):
            mine = [(t, e) for t, e in events if e["sequence"] == seq]
            assert [t for t, _ in mine] == ["mridc/v1/cam-0/preview", "mridc/v1/cam-0/refined"], mine
            assert [e["stage"] for _, e in mine] == ["preview", "refined"]
            assert mine[0][1]["png_path"].endswith(".preview.png")
            assert (tmp_path / "out" / mine[1][1]["png_path"]).is_file()
            assert mine[0][1]["stored_at"] <= mine[1][1]["stored_at"]
    finally:
        device.close()
        consumer.disconnect()
        consumer.loop_stop()
        assert service.terminate() == 0
        service.close()


def test_bad_messages_are_rejected_with_reasons_and_the_service_keeps_serving(tmp_path, broker, pki):
    log_path = tmp_path / "service.log"
    service = ServiceProcess(serve_args(broker, pki, tmp_path / "out", "--worker-id", "solo",
                                        "--metrics", "127.0.0.1:0", "--max-payload", "4096"),
                             env=SERVICE_ENV, log_path=log_path)
    cam, intruder = MqttDevice(broker.port, "cam-0", PASSWORDS["cam-0"], pki.ca_cert), None
    try:
        intruder = MqttDevice(broker.port, "cam-x", PASSWORDS["cam-x"], pki.ca_cert)
        cam.send(1)
        cam.publish(b"\xff\xff\xff\xff not a protobuf")  # malformed
        cam.publish(b"\0" * 10_000)  # oversized
        cam.send(2, content_hash=b"\1" * 32)  # hash mismatch
        cam.send(3, bitstream=b"MR" + b"\0" * 40)  # not a valid MRD stream
        cam.send(4, model_id=0xDEADBEEF)  # unknown model
        # An intruder puts cam-0's id in the envelope but can only publish on its own topic.
        intruder.publish(make_envelope("cam-0", 99).SerializeToString())
        intruder.publish(make_envelope("cam-0", 98).SerializeToString(), topic_device="cam-0")  # ACL drops it
        cam.send(5)
        acks = cam.wait_acks(7)
        reasons = sorted(a.reason.split(":")[0] for a in acks if a.status == Ack.REJECTED)
        assert reasons == ["bad_bitstream", "hash_mismatch", "malformed_envelope", "payload_too_large",
                           "unknown_model"]
        assert sorted(a.sequence for a in acks if a.status == Ack.STORED) == [1, 5]
        intruder_acks = intruder.wait_acks(1)
        assert intruder_acks[0].status == Ack.REJECTED and intruder_acks[0].reason.startswith("topic_mismatch")
        time.sleep(0.5)
        assert len(cam.acks) == 7 and len(intruder.acks) == 1  # the ACL-dropped forgery never arrived
        assert service.proc.poll() is None
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{service.ready['metrics_port']}/metrics",
                                         timeout=5).read().decode()
        assert 'mridc_frames_rejected_total{reason="payload_too_large"} 1.0' in metrics
        assert 'mridc_frames_stored_total{transport="mqtt"} 2.0' in metrics
        assert 'mridc_device_bytes_total{device="cam-0"}' in metrics
        assert "mridc_decode_seconds_bucket" in metrics and "mridc_decode_queue_depth" in metrics
        store = FrameStore(tmp_path / "out")
        assert [(r["device_id"], r["sequence"]) for r in store.query()] == [("cam-0", 1), ("cam-0", 5)]
        store.close()
    finally:
        cam.close()
        if intruder:
            intruder.close()
        assert service.terminate() == 0
