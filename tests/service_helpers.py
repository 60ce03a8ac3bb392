"""Helpers for the cloud service tests: service processes, simulated MQTT devices, log readers.

The test decoder (`TokenPaintDecoder`, a real MRD parse that paints tokens) and the synthetic streams come
from fakes.py, over mridc.lab.synthetic (which the service benchmark uses too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fakes import (  # noqa: F401 - re-exported for the tests
    CODEBOOK_BITS,
    TEST_MODEL_ID,
    TokenPaintDecoder,
    expected_image,
    make_envelope,
    make_stream,
    make_token_paint_decoder,
)

from mridc.shared.bitstream import BitstreamError
from mridc.shared.protocol import acks_topic, frames_topic
from mridc.v1 import mridc_pb2

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
__all__ = ["BitstreamError", "ServiceProcess", "TokenPaintDecoder", "make_envelope", "make_stream"]


def make_test_decoder(models_dir=None, device: str = "cpu") -> TokenPaintDecoder:
    """`--decoder service_helpers:make_test_decoder` in the service tests."""
    return make_token_paint_decoder(models_dir, device)


class ServiceProcess:
    """`python -m mridc.cloud.service.cli serve ...` as a real process; waits for its ready line."""

    def __init__(self, args: list[str], *, env: dict | None = None, log_path: Path | None = None,
                 wait_ready: bool = True, timeout: float = 30.0):
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), full_env.get("PYTHONPATH")) if p)
        full_env.update(env or {})
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "mridc.cloud.service.cli", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=self._log, env=full_env, cwd=REPO_ROOT)
        self.readies: list[dict] = []  # one per worker process start (a supervisor's workers share stdout)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if wait_ready:
            try:
                self.wait_ready(1, timeout)
            except RuntimeError:
                self.kill()
                raise

    @property
    def ready(self) -> dict | None:
        return self.readies[0] if self.readies else None

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            self.lines.append(line)
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if data.get("event") == "ready":
                with self._cond:
                    self.readies.append(data)
                    self._cond.notify_all()

    def wait_ready(self, count: int = 1, timeout: float = 30.0) -> list[dict]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.readies) >= count, timeout):
                raise RuntimeError(f"{len(self.readies)}/{count} workers ready after {timeout} s; "
                                   f"log: {self.log_tail()}")
            return list(self.readies)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        self.terminate()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


class MqttDevice:
    """A simulated camera: MQTT 5 over TLS with its own credentials; publishes payloads, collects FrameAcks."""

    def __init__(self, port: int, device_id: str, password: str, ca_cert: Path | None = None):
        import ssl

        import paho.mqtt.client as mqtt

        self.device_id = device_id
        self.acks: list[mridc_pb2.FrameAck] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-test",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        if ca_cert is not None:
            self.client.tls_set(ca_certs=str(ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError(f"{device_id} could not connect")
        time.sleep(0.2)  # let the SUBACK arrive

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(acks_topic(self.device_id), qos=1)
            self._connected.set()

    def _on_message(self, client, userdata, message):
        ack = mridc_pb2.FrameAck()
        ack.ParseFromString(message.payload)
        with self._lock:
            self.acks.append(ack)

    def publish(self, payload: bytes, topic_device: str | None = None):
        topic = frames_topic(topic_device or self.device_id)
        return self.client.publish(topic, payload, qos=1)

    def send(self, sequence: int, **fields):
        return self.publish(make_envelope(self.device_id, sequence, **fields).SerializeToString())

    def acks_by_sequence(self) -> dict[int, list[mridc_pb2.FrameAck]]:
        with self._lock:
            out: dict[int, list] = {}
            for ack in self.acks:
                out.setdefault(ack.sequence, []).append(ack)
            return out

    def wait_acks(self, count: int, timeout: float = 20.0) -> list[mridc_pb2.FrameAck]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.acks) >= count:
                    return list(self.acks)
            time.sleep(0.02)
        with self._lock:
            raise AssertionError(f"{self.device_id}: {len(self.acks)}/{count} acks after {timeout} s")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def stored_events(log_path: Path) -> list[dict]:
    """The `frame stored` JSON log events of every worker that wrote to log_path."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if data.get("msg") == "frame stored":
            events.append(data)
    return events
