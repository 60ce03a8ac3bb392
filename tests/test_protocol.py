"""The wire contract (mridc.shared.protocol): topics, device ids, envelope and ack, geometry, manifest."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mridc.shared import protocol
from mridc.shared.protocol import (
    AckStatus,
    Channel,
    EdgeManifest,
    ManifestError,
    Topic,
    TopicError,
    build_envelope,
    device_from_topic,
    grid_shape,
    parse_topic,
)
from mridc.v1 import mridc_pb2

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MANIFEST = ROOT / "models" / "edge" / "manifest.json"


# -- topics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", list(Channel))
@pytest.mark.parametrize("device", ["cam-01", "A_b-9", "x" * 64])
def test_topic_round_trip(device, channel):
    name = protocol.topic(device, channel)
    assert name == f"mridc/v1/{device}/{channel.value}"
    assert parse_topic(name) == Topic(device, channel)
    assert device_from_topic(name) == device
    assert device_from_topic(name, channel) == device


def test_named_builders_match_the_generic_one():
    assert protocol.frames_topic("cam-01") == protocol.topic("cam-01", Channel.FRAMES)
    assert protocol.acks_topic("cam-01") == protocol.topic("cam-01", "acks")
    assert protocol.status_topic("cam-01") == str(Topic("cam-01", Channel.STATUS))


@pytest.mark.parametrize(("name", "why"), [
    ("other/v1/cam-01/frames", "not under"),
    ("mridc/v2/cam-01/frames", "not under"),
    ("xmridc/v1/cam-01/frames", "not under"),
    ("mridc/v1/cam-01", "must be"),
    ("mridc/v1/cam-01/frames/extra", "must be"),
    ("mridc/v1/cam-01/video", "unknown channel 'video'"),
    ("mridc/v1//frames", "cannot be a topic level"),
    ("mridc/v1/+/frames", "cannot be a topic level"),
])
def test_bad_topics_are_rejected_with_a_reason(name, why):
    with pytest.raises(TopicError, match=re.escape(why)):
        parse_topic(name)
    assert device_from_topic(name) is None


def test_device_from_topic_can_require_a_channel():
    assert device_from_topic("mridc/v1/cam-a/frames", Channel.FRAMES) == "cam-a"
    assert device_from_topic("mridc/v1/cam-a/acks", Channel.FRAMES) is None


@pytest.mark.parametrize("device", ["", "a/b", "a+b", "#"])
def test_builders_refuse_what_cannot_be_one_topic_level(device):
    with pytest.raises(TopicError):
        protocol.frames_topic(device)


def test_filters():
    assert protocol.topic_filter(Channel.FRAMES) == "mridc/v1/+/frames"
    assert protocol.topic_filter(Channel.ACKS, protocol.ACL_USERNAME) == "mridc/v1/%u/acks"
    assert protocol.topic_filter("status", "cam-01") == protocol.status_topic("cam-01")
    assert protocol.shared_frames_filter() == "$share/mridc-decoders/mridc/v1/+/frames"
    assert protocol.shared_frames_filter("g") == "$share/g/mridc/v1/+/frames"
    assert protocol.all_topics_filter() == "mridc/v1/#"


def test_mosquitto_acl_is_built_from_the_topic_scheme():
    from mridc.cloud.service.security import mosquitto_acl

    acl = mosquitto_acl(["svc"]).splitlines()
    assert acl[2:9] == ["user svc", "topic read mridc/v1/+/frames", "topic read mridc/v1/+/calibration",
                        "topic read mridc/v1/+/status", "topic write mridc/v1/+/acks",
                        "topic readwrite mridc/v1/+/preview", "topic readwrite mridc/v1/+/refined"]
    assert acl[10:14] == ["pattern write mridc/v1/%u/frames", "pattern write mridc/v1/%u/calibration",
                          "pattern readwrite mridc/v1/%u/status", "pattern read mridc/v1/%u/acks"]


def test_the_topic_literal_lives_in_one_production_module():
    # Everything else builds and parses topics through mridc.shared.protocol. The generated protobuf
    # modules under src/mridc/v1 name their .proto file "mridc/v1/mridc.proto": a path, not a topic.
    src = ROOT / "src"
    holders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if "mridc/v1" in p.read_text() and p.parent != src / "mridc" / "v1")
    assert holders == ["mridc/shared/protocol.py"], holders


# -- device ids ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "ok"), [
    ("cam-01", True), ("CAM_9", True), ("a", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("cam.01", False), ("cam/01", False), ("cam 01", False), ("caméra", False),
    ("+", False), ("#", False),
])
def test_device_id_rule(device, ok):
    assert protocol.is_valid_device_id(device) is ok


def test_edge_config_and_cloud_validation_use_the_same_rule():
    from mridc.cloud.service.validation import FrameRejected, Limits, check_envelope
    from mridc.edge.config import ConfigError, DeviceConfig

    config = DeviceConfig()
    config.device.id = "cam.01"
    config.transport.url = "mqtt://127.0.0.1:1883"
    with pytest.raises(ConfigError, match=re.escape(protocol.DEVICE_ID_RULE)):
        config.validate()
    envelope = build_envelope("cam.01", 1, b"x", 1)
    with pytest.raises(FrameRejected, match=re.escape(protocol.DEVICE_ID_RULE)) as info:
        check_envelope(envelope, Limits())
    assert info.value.code == "bad_device_id"


# -- envelope and ack ---------------------------------------------------------------------------------------
def test_build_envelope_hashes_and_stamps():
    envelope = build_envelope("cam-01", 7, b"bits", 0xA2AF765B, meta={"codec": "mridc"})
    assert envelope.content_hash == hashlib.sha256(b"bits").digest()
    assert envelope.capture_time_us > 1_600_000_000 * 10**6
    assert (envelope.device_id, envelope.sequence, envelope.model_id, dict(envelope.meta)) == (
        "cam-01", 7, 0xA2AF765B, {"codec": "mridc"})
    kept = build_envelope("cam-01", 7, b"bits", 1, capture_time_us=5, content_hash=b"h")
    assert (kept.capture_time_us, kept.content_hash) == (5, b"h")
    assert mridc_pb2.FrameEnvelope.FromString(envelope.SerializeToString()) == envelope


def test_ack_statuses_mirror_the_proto():
    for name, value in mridc_pb2.FrameAck.Status.items():
        assert AckStatus[name.removeprefix("STATUS_")] == value
    assert protocol.FINAL_ACK_STATUSES == {mridc_pb2.FrameAck.STORED, mridc_pb2.FrameAck.DUPLICATE,
                                           mridc_pb2.FrameAck.REJECTED}
    assert not protocol.is_final(mridc_pb2.FrameAck.RETRY_LATER) and not protocol.is_final(99)
    ack = protocol.build_ack("cam-01", 3, AckStatus.STORED, "ok")
    assert (ack.device_id, ack.sequence, ack.status, ack.reason) == ("cam-01", 3, mridc_pb2.FrameAck.STORED, "ok")


# -- geometry -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height", "stride", "scale", "grid"), [
    (768, 512, 16, None, (32, 48)),
    (500, 333, 16, None, (21, 32)),  # padded up to whole tokens
    (1, 1, 16, None, (1, 1)),
    (768, 512, 16, 1.0, (32, 48)),
    (768, 512, 16, 0.5, (16, 24)),
    (500, 333, 16, 0.5, (10, 16)),  # rounded, not padded
    (64, 48, 8, 0.05, (1, 1)),  # at least one token per side
    (1920, 1080, 16, 0.25, (17, 30)),
])
def test_grid_shape(width, height, stride, scale, grid):
    assert grid_shape(width, height, stride, scale) == grid


@pytest.mark.parametrize("scale", [0.0, -0.5, 2.5])
def test_grid_shape_refuses_scales_outside_0_to_max(scale):
    with pytest.raises(ValueError, match="scale"):
        grid_shape(768, 512, 16, scale)


@pytest.mark.parametrize(("width", "height", "scale"), [(768, 512, 0.5), (500, 333, 0.37), (97, 61, 0.8)])
def test_scaled_round_trip(width, height, scale):
    stride = 16
    rng = np.random.default_rng(width)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    grid = grid_shape(width, height, stride, scale)
    small = protocol.resize_for_grid(frame, grid, stride)
    assert small.shape == (grid[0] * stride, grid[1] * stride, 3) and small.dtype == np.uint8
    assert protocol.is_scaled(width, height, *grid, stride) == (grid != grid_shape(width, height, stride))
    back = protocol.resize_to_frame(small, width, height)
    assert back.shape == frame.shape and back.dtype == np.uint8
    assert not protocol.is_scaled(width, height, *grid_shape(width, height, stride), stride)


def test_resizes_are_pillow_box_down_and_lanczos_up():
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    small = protocol.resize_for_grid(frame, (3, 5), 16)
    assert np.array_equal(small, np.asarray(Image.fromarray(frame).resize((80, 48), Image.BOX)))
    assert np.array_equal(protocol.resize_to_frame(small, 130, 90),
                          np.asarray(Image.fromarray(small).resize((130, 90), Image.LANCZOS)))


# -- edge bundle manifest -----------------------------------------------------------------------------------
def test_shipped_manifest_round_trips_to_the_same_json(tmp_path):
    manifest = EdgeManifest.read(SHIPPED_MANIFEST)
    assert manifest.stride == 16 and manifest.codebook_size == 1024 and manifest.int8 is not None
    assert manifest.model_id_hex == json.loads(SHIPPED_MANIFEST.read_text())["model_id_hex"]
    rewritten = manifest.write(tmp_path / "manifest.json")
    assert json.loads(rewritten.read_text()) == json.loads(SHIPPED_MANIFEST.read_text())
    assert rewritten.read_text() == SHIPPED_MANIFEST.read_text()  # same key order and formatting too
    assert EdgeManifest.read(rewritten) == manifest


def test_manifest_files_match_the_shipped_bundle():
    manifest = EdgeManifest.read(SHIPPED_MANIFEST)
    edge = SHIPPED_MANIFEST.parent
    for name in ("codebook.npy", "token_prior.npz"):  # small files: cheap to hash here
        assert protocol.BundleFile.of(edge / name) == manifest.files[name]


def test_with_files_adds_without_reordering():
    manifest = EdgeManifest.read(SHIPPED_MANIFEST)
    extra = protocol.BundleFile(sha256="0" * 64, bytes=1)
    updated = manifest.with_files({"encoder_fp32.onnx": extra, "new.bin": extra})
    assert list(updated.files) == [*manifest.files, "new.bin"]
    assert updated.files["encoder_fp32.onnx"] == extra and manifest.files["encoder_fp32.onnx"] != extra


@pytest.mark.parametrize(("change", "why"), [
    ({"format": "other/1"}, "format"),
    ({"surprise": 1}, "unknown manifest keys: surprise"),
    ({"model_id_hex": "00000000"}, "model_id_hex"),
])
def test_bad_manifests_are_refused(change, why):
    data = {**json.loads(SHIPPED_MANIFEST.read_text()), **change}
    with pytest.raises(ManifestError, match=re.escape(why)):
        EdgeManifest.from_dict(data)


def test_manifest_without_optional_blocks():
    data = json.loads(SHIPPED_MANIFEST.read_text())
    for key in ("input", "output", "token_entropy_bits", "codes_used_in_prior_data", "int8"):
        data.pop(key)
    manifest = EdgeManifest.from_dict(data)
    assert manifest.int8 is None and manifest.to_dict() == data
    del data["stride"]
    with pytest.raises(ManifestError, match="stride"):
        EdgeManifest.from_dict(data)
