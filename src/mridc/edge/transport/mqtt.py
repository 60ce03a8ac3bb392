"""MQTT 5 transport (paho-mqtt 2): QoS 1, persistent session, retained heartbeat and last will.

Topics (``mridc.shared.protocol``): frames up, acks down (both QoS 1), and a retained JSON status
heartbeat whose last will is ``{"state": "offline"}``.

The session is persistent (``clean_start=False`` and a session expiry interval) with a client id
fixed per device, so acks the cloud published while the device was away are delivered when it
comes back, and QoS 1 frames in flight are resent. Subscriptions are made in ``on_connect`` so
they come back after any reconnect. The network loop is ours (not ``loop_start``) so that
reconnect delays get jitter.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mridc.edge.transport.base import Backoff, TlsFiles, Transport
from mridc.shared.protocol import acks_topic, calibration_topic, frames_topic, status_topic
from mridc.v1 import mridc_pb2

log = logging.getLogger("mridc.edge.mqtt")


class MqttTransport(Transport):
    scheme = "mqtt"

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        client_id: str | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 7 * 24 * 3600,
        backoff: Backoff | None = None,
        max_inflight: int = 20,
    ) -> None:
        super().__init__(device_id)
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.client_id = client_id or f"mridc-edge-{device_id}"
        self._stop = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # our loop reconnects, with jitter
        )
        client.enable_logger(logging.getLogger("mridc.edge.mqtt.paho"))
        client.max_inflight_messages_set(max_inflight)
        if username:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED)
            self.scheme = "mqtts"
        client.will_set(status_topic(device_id), json.dumps({"state": "offline", "device_id": device_id}),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._subscribed = threading.Event()

    # -- paho callbacks (run on our network thread) -----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s: broker %s:%d refused the connection: %s", self.device_id, self.host, self.port,
                      reason_code)
            return
        self.stats["connects"] += 1
        log.info("%s: connected to %s:%d (session present: %s)", self.device_id, self.host, self.port,
                 flags.session_present)
        client.subscribe(acks_topic(self.device_id), qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("%s: subscription to %s refused: %s (check the broker ACL)", self.device_id,
                      acks_topic(self.device_id), reason_codes)
            return
        self.backoff.reset()
        self._subscribed.set()
        self._connected.set()

    def _on_disconnect(self, client, userdata, disconnect_flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was:
            self.stats["disconnects"] += 1
            (log.info if self._closing else log.warning)("%s: disconnected from %s:%d: %s", self.device_id, self.host,
                                                         self.port, reason_code)

    def _on_message(self, client, userdata, message) -> None:
        try:
            ack = mridc_pb2.FrameAck.FromString(message.payload)
        except Exception:  # noqa: BLE001 - a bad message must not kill the network loop
            log.warning("%s: undecodable ack on %s (%d bytes)", self.device_id, message.topic, len(message.payload))
            return
        if ack.device_id and ack.device_id != self.device_id:
            log.warning("%s: ignoring ack addressed to %s", self.device_id, ack.device_id)
            return
        self._deliver_ack(ack)

    # -- network loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                                   properties=props)
        while not self._stop.is_set():
            try:
                self._client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                delay = self.backoff.next_delay()
                log.info("%s: cannot reach %s:%d (%s); retry in %.1f s", self.device_id, self.host, self.port,
                         exc, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set() and self._client.socket() is not None:
                if self._client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                    break
            self._connected.clear()
            if not self._stop.is_set():
                delay = self.backoff.next_delay()
                log.info("%s: reconnecting in %.1f s", self.device_id, delay)
                self._stop.wait(delay)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.device_id}", daemon=True)
            self._thread.start()

    def send(self, envelope: mridc_pb2.FrameEnvelope) -> bool:
        return self._publish(frames_topic(self.device_id), envelope.SerializeToString(), "frames_sent")

    supports_calibration = True

    def send_calibration(self, message: mridc_pb2.CalibrationFrame) -> bool:
        return self._publish(calibration_topic(self.device_id), message.SerializeToString(), "calibration_sent")

    def _publish(self, topic: str, payload: bytes, counter: str) -> bool:
        """QoS 1 publish when connected; counts the message and its bytes. False: keep it queued."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.stats[counter] = self.stats.get(counter, 0) + 1
        self.stats["bytes_sent"] += len(payload)
        return True

    def publish_status(self, status: dict) -> None:
        payload = json.dumps({"state": "online", "device_id": self.device_id, "ts": time.time(), **status},
                             sort_keys=True)
        if self._connected.is_set():
            self._client.publish(status_topic(self.device_id), payload, qos=1, retain=True)

    def close(self, timeout: float = 3.0) -> None:
        self._closing = True
        if self._connected.is_set():
            # A clean disconnect does not fire the will, so say "offline" ourselves.
            info = self._client.publish(
                status_topic(self.device_id),
                json.dumps({"state": "offline", "device_id": self.device_id, "reason": "shutdown", "ts": time.time()}),
                qos=1, retain=True,
            )
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline and self._thread is not None:
                time.sleep(0.02)
            self._client.disconnect()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._connected.clear()
