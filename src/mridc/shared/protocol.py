"""The device <-> cloud wire contract, written once: MQTT topics, frame envelope and ack, frame geometry,
and the edge bundle manifest. The camera, the cloud service, the benchmarks and the simulator all import it.

No torch, paho or grpc here (the edge imports this module); Pillow is imported only by the two resize
functions.

Topics (docs/architecture.md), one level per part, ``{device_id}`` obeying the device-id rule:

- ``mridc/v1/{device_id}/frames``: device -> cloud, serialized ``FrameEnvelope``, QoS 1
- ``mridc/v1/{device_id}/acks``: cloud -> device, serialized ``FrameAck``, QoS 1
- ``mridc/v1/{device_id}/status``: retained JSON heartbeat; last will ``{"state": "offline"}``

The cloud workers share ``$share/mridc-decoders/mridc/v1/+/frames``, so the broker splits the stream.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mridc.v1 import mridc_pb2

# -- device ids -------------------------------------------------------------------------------------------
DEVICE_ID_RULE = "[A-Za-z0-9_-]{1,64}"  # also the MQTT username and one topic level, so no '/', '+', '#'
DEVICE_ID_RE = re.compile(rf"^{DEVICE_ID_RULE}$")


def is_valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.match(device_id))


# -- MQTT topics ------------------------------------------------------------------------------------------
TOPIC_ROOT = "mridc/v1"
SHARED_GROUP = "mridc-decoders"
ANY_DEVICE = "+"  # MQTT single-level wildcard
ACL_USERNAME = "%u"  # mosquitto ACL patterns substitute the client's username (= its device id)


class Channel(enum.StrEnum):
    FRAMES = "frames"
    ACKS = "acks"
    STATUS = "status"
    PREVIEW = "preview"  # cloud -> consumers: a frame's first picture is stored (JSON event)
    REFINED = "refined"  # cloud -> consumers: a frame's final picture is stored (JSON event)
    CALIBRATION = "calibration"  # device -> cloud: a calibration still of the scene (CalibrationFrame)


class TopicError(ValueError):
    """A topic that is not one of MRIDC's; the message says which part is wrong."""


@dataclass(frozen=True)
class Topic:
    device_id: str
    channel: Channel

    def __str__(self) -> str:
        return f"{TOPIC_ROOT}/{self.device_id}/{self.channel}"


def _device_level(device_id: str) -> str:
    if not device_id or any(c in device_id for c in "/+#"):
        raise TopicError(f"device id {device_id!r} cannot be a topic level (empty, or has '/', '+' or '#')")
    return device_id


def topic(device_id: str, channel: Channel | str) -> str:
    """The topic a device publishes (frames, status) or receives (acks) on."""
    return str(Topic(_device_level(device_id), Channel(channel)))


def frames_topic(device_id: str) -> str:
    return topic(device_id, Channel.FRAMES)


def acks_topic(device_id: str) -> str:
    return topic(device_id, Channel.ACKS)


def status_topic(device_id: str) -> str:
    return topic(device_id, Channel.STATUS)


def calibration_topic(device_id: str) -> str:
    return topic(device_id, Channel.CALIBRATION)


def picture_topic(device_id: str, stage: str) -> str:
    """Where the service announces a stored picture: `preview` (first) or `refined` (final)."""
    return topic(device_id, Channel.PREVIEW if stage == "preview" else Channel.REFINED)


def parse_topic(name: str) -> Topic:
    """``mridc/v1/cam-01/frames`` -> ``Topic("cam-01", Channel.FRAMES)``; TopicError for anything else."""
    root, sep, rest = name.partition(f"{TOPIC_ROOT}/")
    if root or not sep:
        raise TopicError(f"topic {name!r} is not under {TOPIC_ROOT}/")
    levels = rest.split("/")
    if len(levels) != 2:
        raise TopicError(f"topic {name!r} must be {TOPIC_ROOT}/<device id>/<channel>")
    device_id, channel = levels
    try:
        kind = Channel(channel)
    except ValueError:
        raise TopicError(f"topic {name!r}: unknown channel {channel!r} "
                         f"(expected one of {', '.join(c.value for c in Channel)})") from None
    return Topic(_device_level(device_id), kind)


def device_from_topic(name: str, channel: Channel | str | None = None) -> str | None:
    """The device a topic belongs to; None when it is not ours (or not on ``channel``)."""
    try:
        parsed = parse_topic(name)
    except TopicError:
        return None
    if channel is not None and parsed.channel != Channel(channel):
        return None
    return parsed.device_id


def topic_filter(channel: Channel | str, device: str = ANY_DEVICE) -> str:
    """A subscription filter or ACL topic: every device's ``channel`` by default, or ``ACL_USERNAME``'s own."""
    device = device if device in (ANY_DEVICE, ACL_USERNAME) else _device_level(device)
    return f"{TOPIC_ROOT}/{device}/{Channel(channel)}"


def shared_frames_filter(group: str = SHARED_GROUP) -> str:
    """The cloud workers' shared subscription: the broker hands each frame to one member of ``group``."""
    return f"$share/{group}/{topic_filter(Channel.FRAMES)}"


def shared_calibration_filter(group: str = SHARED_GROUP) -> str:
    """The workers' shared subscription to every device's calibration frames."""
    return f"$share/{group}/{topic_filter(Channel.CALIBRATION)}"


def all_topics_filter() -> str:
    """Everything MRIDC publishes (for watching a broker with mosquitto_sub)."""
    return f"{TOPIC_ROOT}/#"


# -- frame envelope and ack -------------------------------------------------------------------------------
class AckStatus(enum.IntEnum):
    """``FrameAck.Status``, by name; members compare equal to the protobuf ints."""

    UNSPECIFIED = mridc_pb2.FrameAck.STATUS_UNSPECIFIED
    STORED = mridc_pb2.FrameAck.STORED
    DUPLICATE = mridc_pb2.FrameAck.DUPLICATE
    REJECTED = mridc_pb2.FrameAck.REJECTED
    RETRY_LATER = mridc_pb2.FrameAck.RETRY_LATER
    NEED_INTRA = mridc_pb2.FrameAck.NEED_INTRA


# The statuses after which the device drops the frame: it is stored, was stored before, or never will be.
# Anything else (RETRY_LATER, NEED_INTRA: send it again intra, or a status this version does not know) keeps it
# queued for a resend.
FINAL_ACK_STATUSES = frozenset({AckStatus.STORED, AckStatus.DUPLICATE, AckStatus.REJECTED})


def is_final(status: int) -> bool:
    return status in FINAL_ACK_STATUSES


def build_envelope(device_id: str, sequence: int, bitstream: bytes, model_id: int, *,
                   capture_time_us: int | None = None, content_hash: bytes | None = None,
                   meta: Mapping[str, str] | None = None) -> mridc_pb2.FrameEnvelope:
    """One frame on the wire. ``content_hash`` defaults to the SHA-256 of ``bitstream`` (what the cloud
    checks), ``capture_time_us`` to now."""
    return mridc_pb2.FrameEnvelope(
        device_id=device_id, sequence=sequence,
        capture_time_us=time.time_ns() // 1000 if capture_time_us is None else capture_time_us,
        bitstream=bitstream,
        content_hash=hashlib.sha256(bitstream).digest() if content_hash is None else content_hash,
        model_id=model_id, meta=dict(meta or {}))


def build_ack(device_id: str, sequence: int, status: int, reason: str = "",
              calibrate: bool = False) -> mridc_pb2.FrameAck:
    """An ack; `calibrate` asks the device for a round of calibration frames (scene adaptation)."""
    return mridc_pb2.FrameAck(device_id=device_id, sequence=sequence, status=status, reason=reason,
                              calibrate=calibrate)


# -- calibration frames (scene adaptation) -------------------------------------------------------------------
CALIBRATION_FORMATS = ("jpeg", "png", "webp", "avif")


def build_calibration(device_id: str, sequence: int, image: bytes, image_format: str, width: int, height: int,
                      model_id: int, *, capture_time_us: int | None = None, reason: str = "schedule"
                      ) -> mridc_pb2.CalibrationFrame:
    """One calibration still on the wire; `content_hash` is the SHA-256 of `image` (what the cloud checks)."""
    if image_format not in CALIBRATION_FORMATS:
        raise ValueError(f"calibration format must be one of {CALIBRATION_FORMATS}, got {image_format!r}")
    return mridc_pb2.CalibrationFrame(
        device_id=device_id, sequence=sequence,
        capture_time_us=time.time_ns() // 1000 if capture_time_us is None else capture_time_us,
        image=image, format=image_format, width=width, height=height, model_id=model_id,
        content_hash=hashlib.sha256(image).digest(), reason=reason)


# -- datagram links (CoAP) -------------------------------------------------------------------------------
# Over CoAP a frame travels as slices (`mridc.shared.slices`), one `SliceDatagram` each, sent non-confirmable
# to COAP_SLICE_PATH with No-Response, so a lost one costs one band of tokens. The device asks what arrived
# with a `SliceQuery` to COAP_QUERY_PATH; the `SliceReport` answer holds the received-slices bitmap and, once
# the frame is stored, the ack status. Every message carries an 8-byte HMAC-SHA256 tag under the device key
# (the SHA-256 of the device's token, which is what the cloud's token file holds), so the token itself never
# crosses the link and a forged slice or report is dropped.
COAP_SLICE_PATH = "s"
COAP_QUERY_PATH = "q"
COAP_DEFAULT_PORT = 5683
MAC_BYTES = 8
MAX_DATAGRAM_SLICES = 1024  # = mridc.shared.slices.MAX_SLICES (a frame has at most that many token rows)


class DatagramError(ValueError):
    """A datagram that is not a well-formed, correctly signed MRIDC message; `code` is a metric label."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def device_key(token: str) -> bytes:
    """The MAC key of a device: the SHA-256 of its token (= the digest the cloud's token file stores)."""
    return hashlib.sha256(token.encode()).digest()


def _mac(message, key: bytes) -> bytes:
    import hmac

    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("mac")
    return hmac.new(key, unsigned.SerializeToString(deterministic=True), hashlib.sha256).digest()[:MAC_BYTES]


def sign(message, key: bytes | None):
    """Set ``message.mac`` (any of the three datagram messages); no key leaves it unsigned. Returns it."""
    message.ClearField("mac")
    if key is not None:
        message.mac = _mac(message, key)
    return message


def verify(message, key: bytes | None) -> bool:
    """Whether ``message.mac`` is right under ``key`` (no key: only an unsigned message passes)."""
    import hmac

    if key is None:
        return not message.mac
    return len(message.mac) == MAC_BYTES and hmac.compare_digest(message.mac, _mac(message, key))


def parse_datagram(payload: bytes, kind, *, max_bytes: int):
    """Parse one datagram as ``kind`` (``mridc_pb2.SliceDatagram``, ``SliceQuery`` or ``SliceReport``) and check
    the fields that need no key; DatagramError (with a metric code) otherwise. The MAC is checked by the caller,
    who knows the device's key."""
    from google.protobuf.message import DecodeError

    if len(payload) > max_bytes:
        raise DatagramError("too_large", f"{len(payload)} bytes > limit {max_bytes}")
    message = kind()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise DatagramError("malformed", f"not a {kind.__name__}: {exc}") from None
    if not is_valid_device_id(message.device_id):
        raise DatagramError("bad_device_id", f"device_id {message.device_id[:80]!r} is not {DEVICE_ID_RULE}")
    if message.sequence >= 2**63:
        raise DatagramError("bad_sequence", f"sequence {message.sequence} >= 2**63")
    if kind is mridc_pb2.SliceDatagram:
        if not 1 <= message.slice_count <= MAX_DATAGRAM_SLICES:
            raise DatagramError("bad_slice_count",
                                f"slice_count {message.slice_count} not in [1, {MAX_DATAGRAM_SLICES}]")
        if message.slice_index >= message.slice_count:
            raise DatagramError("bad_slice_index", f"slice_index {message.slice_index} >= {message.slice_count}")
        if not message.slice:
            raise DatagramError("empty_slice", "no slice bytes")
        if message.capture_time_us <= 0:
            raise DatagramError("bad_capture_time", f"capture_time_us must be > 0, got {message.capture_time_us}")
    return message


def slice_bitmap(indexes: Iterable[int], count: int) -> bytes:
    """Bit i (byte i // 8, least significant bit first) set for each held slice i < count."""
    bits = bytearray((count + 7) // 8)
    for i in indexes:
        if 0 <= i < count:
            bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def bitmap_indexes(bitmap: bytes, count: int) -> set[int]:
    return {i for i in range(min(count, 8 * len(bitmap))) if bitmap[i // 8] >> (i % 8) & 1}


def frame_slices(bitstream: bytes) -> list[bytes]:
    """What goes out as datagrams: a sliced frame's slices (a `pack_slices` container), else the whole stream."""
    from mridc.shared.slices import is_sliced_file, unpack_slices

    return unpack_slices(bitstream) if is_sliced_file(bitstream) else [bitstream]


def join_slices(slices: list[bytes], count: int) -> bytes:
    """The bitstream the cloud decodes from the slices it holds (in index order): a one-slice frame is its
    stream as it is, a sliced frame a `pack_slices` container of what arrived."""
    from mridc.shared.slices import is_slice, pack_slices

    return slices[0] if count == 1 and not is_slice(slices[0]) else pack_slices(slices)


# -- frame geometry ---------------------------------------------------------------------------------------
# Full resolution: the frame is edge-padded up to a multiple of the stride, one token per stride x stride
# cell. Scaled mode: the camera resizes the frame to exactly grid x stride pixels (Pillow BOX) and the cloud
# resizes the decode back to the frame size (Pillow LANCZOS). The MRD header carries the frame size and the
# grid, so the cloud tells the two apart without being told (docs/bitstream.md).

MAX_RESAMPLE_SCALE = 2.0  # a finer grid than this costs the encoder over 4x its full-resolution time


def grid_shape(width: int, height: int, stride: int, scale: float | None = None) -> tuple[int, int]:
    """(grid_h, grid_w) for a width x height frame: full resolution (ceil) when ``scale`` is None or 1,
    else the frame scaled by ``scale`` (0 < scale <= MAX_RESAMPLE_SCALE), rounded to whole tokens, at least one
    per side. A scale above 1 gives a grid finer than the full-resolution one (a resampled stream)."""
    if scale is None or scale == 1:
        return -(-height // stride), -(-width // stride)
    if not 0 < scale <= MAX_RESAMPLE_SCALE:
        raise ValueError(f"scale must be in (0, {MAX_RESAMPLE_SCALE}], got {scale}")
    return max(1, round(height * scale / stride)), max(1, round(width * scale / stride))


def is_scaled(width: int, height: int, grid_h: int, grid_w: int, stride: int, resampled: bool = False) -> bool:
    """Whether the grid covers a resized frame: the stream says so (FLAG_RESAMPLED), or, by the implicit v1
    rule, its grid is smaller than the frame needs at full resolution (a downscaled frame)."""
    if resampled:
        return True
    full_h, full_w = grid_shape(width, height, stride)
    return grid_h < full_h or grid_w < full_w


def resize_for_grid(image: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """Edge direction: an HxWx3 uint8 frame -> exactly (grid_h * stride) x (grid_w * stride) pixels, smaller
    (scaled mode) or larger (a finer grid than full resolution)."""
    from PIL import Image

    # Pillow resamples 8-bit images in fixed point, so ARM and x86 get the same pixels (OpenCV's INTER_AREA
    # differed by one level on 0.07 % of pixels under the arm64 test). Box when shrinking; bicubic (a
    # polynomial kernel, no libm call in its weights) when a finer grid enlarges the frame.
    size = (grid[1] * stride, grid[0] * stride)
    h, w = image.shape[:2]
    enlarging = size[0] > w or size[1] > h
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC if enlarging else Image.BOX))


def resize_to_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Cloud direction: a decoded grid-sized HxWx3 uint8 image -> the camera frame's width x height (Lanczos,
    up for a downscaled frame, down for a finer grid)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


# -- edge bundle manifest (models/edge/manifest.json) -----------------------------------------------------
BUNDLE_FORMAT = "mridc-edge-bundle/1"


class ManifestError(ValueError):
    """manifest.json is missing a field, has an unknown one, or is of another format."""


@dataclass(frozen=True)
class BundleFile:
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | Path) -> BundleFile:
        data = Path(path).read_bytes()
        return cls(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str
    range: tuple[float, float]
    pad: str


@dataclass(frozen=True)
class OutputSpec:
    name: str
    layout: str
    normalised: bool


@dataclass(frozen=True)
class Int8Notes:
    """How the int8 encoder was made, for whoever rebuilds it."""

    calibration: str
    float_nodes: str


@dataclass(frozen=True)
class EdgeManifest:
    model_id: int
    stride: int
    codebook_size: int
    code_dim: int
    input: InputSpec | None = None
    output: OutputSpec | None = None
    token_entropy_bits: float | None = None
    codes_used_in_prior_data: int | None = None
    files: Mapping[str, BundleFile] = field(default_factory=dict)
    int8: Int8Notes | None = None
    format: str = BUNDLE_FORMAT

    @property
    def model_id_hex(self) -> str:
        return f"{self.model_id:08x}"

    def with_files(self, files: Mapping[str, BundleFile]) -> EdgeManifest:
        """A copy with ``files`` added (or replaced), keeping the existing order."""
        return dataclasses.replace(self, files={**self.files, **files})

    def to_dict(self) -> dict[str, Any]:
        # Key order is the file's: re-writing the shipped manifest must give the same text.
        out: dict[str, Any] = {"format": self.format, "model_id": self.model_id, "model_id_hex": self.model_id_hex,
                               "stride": self.stride, "codebook_size": self.codebook_size, "code_dim": self.code_dim}
        if self.input is not None:
            out["input"] = {"name": self.input.name, "layout": self.input.layout, "range": list(self.input.range),
                            "pad": self.input.pad}
        if self.output is not None:
            out["output"] = {"name": self.output.name, "layout": self.output.layout,
                             "normalised": self.output.normalised}
        if self.token_entropy_bits is not None:
            out["token_entropy_bits"] = self.token_entropy_bits
        if self.codes_used_in_prior_data is not None:
            out["codes_used_in_prior_data"] = self.codes_used_in_prior_data
        out["files"] = {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in self.files.items()}
        if self.int8 is not None:
            out["int8"] = {"calibration": self.int8.calibration, "float_nodes": self.int8.float_nodes}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdgeManifest:
        known = {"format", "model_id", "model_id_hex", "stride", "codebook_size", "code_dim", "input", "output",
                 "token_entropy_bits", "codes_used_in_prior_data", "files", "int8"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown manifest keys: {', '.join(unknown)}")
        if data.get("format") != BUNDLE_FORMAT:
            raise ManifestError(f"manifest format {data.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        try:
            manifest = cls(
                model_id=int(data["model_id"]), stride=int(data["stride"]),
                codebook_size=int(data["codebook_size"]), code_dim=int(data["code_dim"]),
                input=InputSpec(**{**data["input"], "range": tuple(data["input"]["range"])}) if "input" in data
                else None,
                output=OutputSpec(**data["output"]) if "output" in data else None,
                token_entropy_bits=data.get("token_entropy_bits"),
                codes_used_in_prior_data=data.get("codes_used_in_prior_data"),
                files={name: BundleFile(**f) for name, f in data.get("files", {}).items()},
                int8=Int8Notes(**data["int8"]) if "int8" in data else None,
                format=data["format"],
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest field missing or malformed: {exc}") from None
        if "model_id_hex" in data and data["model_id_hex"] != manifest.model_id_hex:
            raise ManifestError(f"model_id_hex {data['model_id_hex']!r} is not model_id {manifest.model_id}")
        return manifest

    @classmethod
    def read(cls, path: str | Path) -> EdgeManifest:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def bundle_files(folder: str | Path, names: Iterable[str]) -> dict[str, BundleFile]:
    """SHA-256 and size of each of ``names`` that exists in ``folder``, in the order given."""
    folder = Path(folder)
    return {name: BundleFile.of(folder / name) for name in names if (folder / name).exists()}
