"""Device configuration: one TOML file, validated at start-up with clear messages.

Every field is documented in docs/deploy-edge.md. A minimal file::

    [device]
    id = "cam-01"

    [transport]
    url = "mqtts://broker.example.net:8883"
    username = "cam-01"
    password_file = "/etc/mridc/cam-01.password"
    ca_file = "/etc/mridc/ca.crt"

Command-line flags of ``mridc-edge run`` override the file (see ``edge/agent.py``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mridc.edge.queue import POLICIES
from mridc.shared.protocol import DEVICE_ID_RULE, is_valid_device_id


class ConfigError(ValueError):
    """The device config is invalid; the message says which field and why."""


@dataclass
class DeviceSection:
    id: str = ""  # [A-Za-z0-9_-]{1,64}; also the MQTT client id suffix and topic segment


@dataclass
class SourceSection:
    uri: str = "camera:0"  # camera:INDEX | VIDEO_FILE | IMAGE_DIR
    fps: float = 0.2  # frames per second taken from the source (0 = as fast as the encoder goes)
    width: int = 0  # resize to this size before encoding (0 = keep the source size)
    height: int = 0
    loop: bool = False  # restart a video file or image folder at its end


@dataclass
class Roi:
    x: int = 0
    y: int = 0
    w: int = 0
    h: int = 0


@dataclass
class EncoderSection:
    bpp: float = 0.02  # target bits per pixel
    min_bpp: float = 0.005  # floor for the lower_bpp queue policy
    backend: str = "onnx"  # onnx | litert | torch
    models_dir: str = ""  # empty: the packaged models (or $MRIDC_MODELS)
    rois: list[Roi] = field(default_factory=list)  # regions kept at higher fidelity, pixels
    # Cut each frame into slices of at most this many bytes that decode alone (lossy datagram links). 0: whole
    # frames, except over coap://, where the default is what fits the transport's MTU.
    slice_bytes: int = 0
    # Fixed cameras: code frames inter (only what changed since the newest frame the cloud stored), with an
    # intra frame at least every `refresh_frames` frames (0: only when the scene changes or the cloud asks).
    inter: bool = False
    refresh_frames: int = 60


@dataclass
class TransportSection:
    url: str = ""  # mqtt://, mqtts://, grpc://, grpcs://, coap:// HOST:PORT
    username: str = ""  # MQTT user name (default: none)
    password: str = ""  # MQTT password; prefer password_file
    password_file: str = ""
    token: str = ""  # gRPC bearer token / CoAP datagram key (per device); prefer token_file
    token_file: str = ""
    ca_file: str = ""  # CA that signed the server certificate (TLS URLs)
    cert_file: str = ""  # client certificate (mutual TLS), optional
    key_file: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600  # MQTT: broker keeps the session (and queued acks) this long
    connect_deadline_s: float = 10.0  # gRPC: channel must be ready within this
    ack_timeout_s: float = 60.0  # resend a frame with no cloud ack after this long
    window: int = 4  # frames in flight without an ack
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    # CoAP (datagram links): the largest datagram the link carries, whether missing slices are sent again,
    # and how long the cloud waits for a frame's slices before it decodes what came.
    mtu: int = 1152
    retransmit: bool = True
    deadline_s: float = 5.0


@dataclass
class QueueSection:
    path: str = ""  # SQLite file; empty: $STATE_DIRECTORY or ~/.local/state/mridc, then <device>/queue.db
    max_frames: int = 10_000
    max_mb: float = 64.0
    policy: str = "drop_oldest"  # drop_oldest | drop_newest | lower_bpp


@dataclass
class StatusSection:
    heartbeat_s: float = 30.0  # retained status message period (MQTT)


MIN_STILL_QUALITY = 40  # below this a still is downscaled instead: blocking artefacts would be learnt as the scene


@dataclass
class CalibrationSection:
    enabled: bool = False  # send calibration stills (MQTT transports only)
    frames: int = 3  # stills per round
    every_frames: int = 5  # live frames between two stills of a round
    interval_s: float = 86400.0  # a new round this often (0: only at start-up and on request)
    at_startup: bool = True  # a round when the agent starts
    max_bytes: int = 150_000  # per still: the JPEG quality (then the size) is lowered to fit
    quality: int = 90  # JPEG quality to start from

    def validate(self) -> None:
        if self.frames < 1 or self.every_frames < 1:
            raise ConfigError("calibration.frames and calibration.every_frames must be >= 1")
        if self.interval_s < 0:
            raise ConfigError(f"calibration.interval_s must be >= 0, got {self.interval_s}")
        if not 10_000 <= self.max_bytes <= 4_000_000:
            raise ConfigError(f"calibration.max_bytes must be in [10000, 4000000], got {self.max_bytes}")
        if not MIN_STILL_QUALITY <= self.quality <= 100:
            raise ConfigError(f"calibration.quality must be in [{MIN_STILL_QUALITY}, 100], got {self.quality}")


@dataclass
class DeviceConfig:
    device: DeviceSection = field(default_factory=DeviceSection)
    source: SourceSection = field(default_factory=SourceSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    transport: TransportSection = field(default_factory=TransportSection)
    queue: QueueSection = field(default_factory=QueueSection)
    status: StatusSection = field(default_factory=StatusSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)

    # -- derived values ----------------------------------------------------------------------------
    def queue_path(self) -> Path:
        if self.queue.path:
            return Path(self.queue.path).expanduser()
        base = os.environ.get("STATE_DIRECTORY") or os.path.expanduser("~/.local/state/mridc")
        return Path(base) / self.device.id / "queue.db"

    def password(self) -> str | None:
        return _secret(self.transport.password, self.transport.password_file, "transport.password_file")

    def token(self) -> str | None:
        return _secret(self.transport.token, self.transport.token_file, "transport.token_file")

    def validate(self) -> DeviceConfig:
        """Check cross-field rules; raises ConfigError naming the field."""
        if not self.device.id:
            raise ConfigError("device.id is required (or pass --device-id)")
        if not is_valid_device_id(self.device.id):
            raise ConfigError(f"device.id {self.device.id!r} must match {DEVICE_ID_RULE}")
        if not self.transport.url:
            raise ConfigError("transport.url is required, e.g. mqtt://127.0.0.1:1883 (or pass --transport)")
        scheme = self.transport.url.split("://", 1)[0].lower() if "://" in self.transport.url else ""
        if scheme not in ("mqtt", "mqtts", "grpc", "grpcs", "coap"):
            raise ConfigError(f"transport.url {self.transport.url!r} must start with mqtt://, mqtts://, grpc://, "
                              "grpcs:// or coap://")
        self.calibration.validate()
        if self.calibration.enabled and scheme not in ("mqtt", "mqtts"):
            raise ConfigError("calibration.enabled needs an MQTT transport (calibration stills go on their own "
                              "MQTT channel)")
        from mridc.shared.slices import MAX_SLICE_BYTES, MIN_SLICE_BYTES

        if self.encoder.slice_bytes and not MIN_SLICE_BYTES <= self.encoder.slice_bytes <= MAX_SLICE_BYTES:
            raise ConfigError(f"encoder.slice_bytes must be 0 or in [{MIN_SLICE_BYTES}, {MAX_SLICE_BYTES}], got "
                              f"{self.encoder.slice_bytes}")
        if self.encoder.inter and self.encoder.slice_bytes:
            raise ConfigError("encoder.inter and encoder.slice_bytes cannot be combined (inter frames are not sliced)")
        if self.encoder.refresh_frames < 0:
            raise ConfigError(f"encoder.refresh_frames must be >= 0, got {self.encoder.refresh_frames}")
        if not 64 <= self.transport.mtu <= 65_507:
            raise ConfigError(f"transport.mtu must be in [64, 65507], got {self.transport.mtu}")
        if not 0 < self.transport.deadline_s <= 3600:
            raise ConfigError(f"transport.deadline_s must be in (0, 3600], got {self.transport.deadline_s}")
        if self.queue.policy not in POLICIES:
            raise ConfigError(f"queue.policy {self.queue.policy!r} must be one of {', '.join(POLICIES)}")
        if self.encoder.backend not in ("onnx", "litert", "torch"):
            raise ConfigError(f"encoder.backend {self.encoder.backend!r} must be onnx, litert or torch")
        positive = {
            "encoder.bpp": self.encoder.bpp, "encoder.min_bpp": self.encoder.min_bpp,
            "queue.max_frames": self.queue.max_frames, "queue.max_mb": self.queue.max_mb,
            "transport.ack_timeout_s": self.transport.ack_timeout_s, "transport.window": self.transport.window,
            "transport.keepalive_s": self.transport.keepalive_s, "status.heartbeat_s": self.status.heartbeat_s,
            "transport.backoff_initial_s": self.transport.backoff_initial_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.encoder.min_bpp > self.encoder.bpp:
            raise ConfigError(f"encoder.min_bpp ({self.encoder.min_bpp}) must be <= encoder.bpp ({self.encoder.bpp})")
        if self.transport.backoff_max_s < self.transport.backoff_initial_s:
            raise ConfigError("transport.backoff_max_s must be >= transport.backoff_initial_s")
        if self.source.fps < 0:
            raise ConfigError(f"source.fps must be >= 0, got {self.source.fps}")
        if (self.source.width > 0) != (self.source.height > 0):
            raise ConfigError("source.width and source.height must be set together")
        for i, roi in enumerate(self.encoder.rois):
            if roi.w <= 0 or roi.h <= 0 or roi.x < 0 or roi.y < 0:
                raise ConfigError(f"encoder.rois[{i}] needs x, y >= 0 and w, h > 0, got {roi}")
        for name in ("ca_file", "cert_file", "key_file", "password_file", "token_file"):
            path = getattr(self.transport, name)
            if path and not Path(path).expanduser().is_file():
                raise ConfigError(f"transport.{name}: no such file {path!r}")
        if bool(self.transport.cert_file) != bool(self.transport.key_file):
            raise ConfigError("transport.cert_file and transport.key_file must be set together")
        if (self.transport.ca_file or self.transport.cert_file) and not scheme.endswith("s"):
            raise ConfigError(f"TLS files are set but transport.url uses {scheme}://; use {scheme}s://")
        return self


def _secret(value: str, path: str, name: str) -> str | None:
    if value:
        return value
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from exc
    return None


def _build(cls, data: object, where: str):
    """Dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types by name."""
    table = f"[{where}]" if where else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{table} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {table}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**values)


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return [_convert(item_hint, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(data: dict) -> DeviceConfig:
    """Build (without cross-field validation) from a parsed TOML document."""
    return _build(DeviceConfig, data, "")


def load_config(path: str | os.PathLike) -> DeviceConfig:
    """Read and parse a device TOML file. Call ``.validate()`` after applying CLI overrides."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
