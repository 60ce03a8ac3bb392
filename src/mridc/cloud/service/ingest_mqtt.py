"""MQTT 5 ingest: a shared subscription, QoS 1, manual acknowledgements.

- Every worker subscribes to the shared frames filter (`mridc.shared.protocol.shared_frames_filter`), and to
  the calibration stills' (`shared_calibration_filter`); the
  broker splits the stream.
- A broker message is PUBACKed only in the frame's `done` callback, i.e. after the result is stored (or the
  frame is rejected / a duplicate). A worker that dies holds unacked messages in its broker session.
- The session is persistent (clean_start=False, Session Expiry) under a stable client id = worker id, so a
  restarted worker slot gets its unacked messages redelivered (mosquitto 2 keeps them in that session; it
  does not hand them to the other members of the group).
- Receive Maximum = decode queue size: the broker never has more unacked messages in flight to this worker
  than the queue holds. That is the backpressure: a full queue stops the broker sending.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mridc.shared.protocol import (
    Channel,
    acks_topic,
    device_from_topic,
    picture_topic,
    shared_calibration_filter,
    shared_frames_filter,
)
from mridc.v1 import mridc_pb2

from .config import ServiceConfig
from .validation import FrameRejected, parse_envelope
from .worker import Ack, DecodeService, make_ack

log = logging.getLogger("mridc.cloud.service.mqtt")


class MqttIngest:
    def __init__(self, config: ServiceConfig, service: DecodeService):
        self.config = config
        self.service = service
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.paused = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.worker_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if config.mqtt_username:
            client.username_pw_set(config.mqtt_username, config.mqtt_password)
        _host, _port, tls = config.mqtt_endpoint
        if tls:
            client.tls_set(ca_certs=str(config.mqtt_ca), certfile=str(config.mqtt_cert) if config.mqtt_cert else None,
                           keyfile=str(config.mqtt_key) if config.mqtt_key else None,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(max(20, config.queue_size))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        service.picture_listeners.append(self.publish_picture)

    def publish_picture(self, record) -> None:
        """Announce a stored picture on the device's `preview` (first) and/or `refined` (final) topic.

        A single-stage decode is both the first and the final picture: it goes to both topics."""
        stages = {"preview": ("preview",), "refined": ("refined",)}.get(record.stage, ("preview", "refined"))
        event = {"device_id": record.device_id, "sequence": record.sequence, "stage": record.stage,
                 "capture_time_us": record.capture_time_us, "png_path": record.png_path,
                 "sidecar_path": record.sidecar_path, "width": record.width, "height": record.height,
                 "worker_id": self.config.worker_id}
        if record.stage in record.versions:
            event["stored_at"] = record.versions[record.stage]["stored_at"]
            event["png_path"] = record.versions[record.stage].get("png_path", record.png_path)
        else:
            event["stored_at"] = record.stored_at
        payload = json.dumps(event).encode()
        for stage in stages:
            self.client.publish(picture_topic(record.device_id, stage), payload, qos=1)

    def start(self) -> None:
        host, port, _tls = self.config.mqtt_endpoint
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.queue_size
        self.client.connect_async(host, port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly; the persistent session keeps anything not yet acked for the next start."""
        self.client.disconnect()
        self.client.loop_stop()

    # -- callbacks (paho network thread) -----------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("mqtt connect refused", extra={"fields": {"reason": str(reason_code)}})
            return
        log.info("mqtt connected", extra={"fields": {"session_present": flags.session_present,
                                                      "client_id": self.config.worker_id}})
        self.connected.set()
        # Subscribing in on_connect brings the subscription back after any reconnect.
        client.subscribe([(shared_frames_filter(), 1), (shared_calibration_filter(), 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("mqtt subscribe refused", extra={"fields": {"reasons": [str(rc) for rc in reason_codes]}})
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.warning("mqtt disconnected", extra={"fields": {"reason": str(reason_code)}})

    def _on_message(self, client, userdata, message) -> None:
        if self.paused.is_set():
            return  # shutting down: leave it unacked in the session
        still_device = device_from_topic(message.topic, Channel.CALIBRATION)
        if still_device is not None:  # a calibration still (scene adaptation)
            done = self._done_callback(message.mid, message.qos, still_device)
            try:
                self.service.submit_calibration(message.payload, "mqtt", done, topic_device=still_device)
            except Exception:
                log.exception("calibration submit failed")
                done(make_ack(still_device, 0, Ack.RETRY_LATER, "internal error"))
            return
        topic_device = device_from_topic(message.topic, Channel.FRAMES)
        done = self._done_callback(message.mid, message.qos, topic_device)
        try:
            envelope = parse_envelope(message.payload, self.service.limits)
        except FrameRejected as exc:
            self.service.metrics.frames_in.labels("mqtt").inc()
            self.service._reject(topic_device or "?", 0, exc, done, "mqtt")
            return
        try:
            self.service.submit(envelope, "mqtt", done, topic_device=topic_device,
                                payload_bytes=len(message.payload))
        except Exception:
            log.exception("submit failed")
            done(make_ack(envelope.device_id, envelope.sequence, Ack.RETRY_LATER, "internal error"))

    def _done_callback(self, mid: int, qos: int, topic_device: str | None):
        acked = threading.Event()

        def done(ack: mridc_pb2.FrameAck) -> None:
            if acked.is_set():  # several callbacks never ack one broker message twice
                return
            acked.set()
            if topic_device is not None:
                self.client.publish(acks_topic(topic_device), ack.SerializeToString(), qos=1)
            if qos > 0:
                self.client.ack(mid, qos)

        return done
