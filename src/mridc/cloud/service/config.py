"""Service configuration: one TOML file, overridden by command-line flags, validated at start-up.

Every field is documented in docs/deploy-cloud.md. Unknown keys are an error, so a typo in a config file
fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mridc.cloud.defaults import DEFAULT_BACKEND, DEFAULT_PREVIEW_REALISM, DEFAULT_REFINE_REALISM, DEFAULT_REFINE_STEPS

FIXED_ID_SESSION_EXPIRY_S = 3600
GENERATED_ID_SESSION_EXPIRY_S = 30


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


@dataclass
class ServiceConfig:
    # Where results go: PNGs, JSON sidecars and the SQLite index.
    out_dir: Path = Path("cloud_out")
    # MQTT ingest. None disables it. mqtt://HOST:PORT or mqtts://HOST:PORT (TLS).
    mqtt_url: str | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    # How long the broker keeps this worker's session (and its unacked frames) after a disconnect. Default:
    # 3600 s with a fixed worker_id, which promises to come back; 30 s with a generated one, which never does
    # (a long-lived orphan session would hold frames that only the device's ack timeout then recovers).
    mqtt_session_expiry_s: int | None = None
    # gRPC ingest. None disables it. HOST:PORT; port 0 picks a free one.
    grpc_addr: str | None = None
    # TLS. mqtt_ca verifies the broker; grpc_cert/grpc_key serve gRPC over TLS.
    mqtt_ca: Path | None = None
    mqtt_cert: Path | None = None
    mqtt_key: Path | None = None
    grpc_cert: Path | None = None
    grpc_key: Path | None = None
    grpc_client_ca: Path | None = None  # set to require client certificates (mTLS)
    # Per-device gRPC tokens: TOML/JSON file {device_id = "sha256:<hex>" | "<plain token>"}.
    grpc_tokens: Path | None = None
    allow_insecure: bool = False  # gRPC without TLS and tokens, CoAP unsigned; for tests and local tools only
    # CoAP ingest (datagram links: frames as slices over UDP). None disables it. HOST:PORT.
    coap_addr: str | None = None
    # Per-device keys for CoAP: the same file format as grpc_tokens (default: grpc_tokens itself). Every
    # datagram carries an HMAC under the SHA-256 of the device's token.
    coap_tokens: Path | None = None
    coap_max_datagram_bytes: int = 1280  # larger datagrams are dropped and counted
    coap_max_deadline_s: float = 60.0  # cap on the device's per-frame deadline (how long slices are awaited)
    coap_datagram_rate: float = 50.0  # per device, per second (token bucket); 0 disables
    coap_datagram_burst: int = 400
    coap_max_pending_frames: int = 4096  # frames being gathered at once (oldest dropped beyond it)
    coap_frame_ttl_s: float = 600.0  # how long a gathered frame's slices stay for late slices and queries
    # Prometheus metrics on HOST:PORT; None disables.
    metrics_addr: str | None = None
    # Processes: `workers` > 1 runs a supervisor with that many worker processes.
    workers: int = 1
    # Unique per live worker in the whole fleet: it is the MQTT client id, whose persistent session holds
    # this worker's unacknowledged frames. A second live process under the same id is refused at start-up.
    # Default: HOST-PID, unique per process (`--workers N` appends -0 .. -N-1 to it).
    worker_id: str | None = None
    # Decode queue and batching.
    queue_size: int = 16
    batch_size: int = 4
    batch_wait_ms: int = 20
    grpc_enqueue_timeout_s: float = 5.0
    # Validation limits.
    max_payload_bytes: int = 64 * 1024
    max_bitstream_bytes: int = 48 * 1024
    max_meta_bytes: int = 2048
    # Per-device rate limit (token bucket, per worker process). 0 disables.
    rate_limit_fps: float = 5.0
    rate_limit_burst: int = 20
    # Decoder.
    decoder: str = "mridc"  # "mridc" or "package.module:factory"
    models_dir: Path | None = None
    device: str = "cpu"
    # The first picture's realism: 0 is the tokenizer decode (fast); it is acked and announced at once.
    realism: float = DEFAULT_PREVIEW_REALISM
    # The final picture's. Above `realism`, every frame is decoded twice: the preview first, then (when no
    # live frame waits) this refined decode replaces it. 0 (or <= realism) turns refinement off.
    refine_realism: float = DEFAULT_REFINE_REALISM
    seed: int = 0
    steps: int = DEFAULT_REFINE_STEPS  # DDIM steps at realism 1 (one step at the default refine_realism)
    backend: str = DEFAULT_BACKEND  # decoder backend: auto (ONNX Runtime on a CPU), torch or onnxruntime
    # Logs.
    log_format: str = "json"  # json | text
    log_level: str = "INFO"
    # Scene adaptation (docs/adaptation.md): keep calibration stills, adapt each device's decoder to its scene.
    adapt: bool = False
    adapt_run: bool = True  # False: accept stills and use adapters on disk, but run no adaptation here
    adapt_minutes: float = 15.0  # optimisation budget of one run
    adapt_steps: int = 0  # and/or a step budget (0: none; whichever ends first)
    adapt_threads: int = 1  # CPU threads of one run (it runs at nice 19 in a child process)
    adapt_min_stills: int = 4  # a device's first run starts at this many stills
    adapt_rerun_stills: int = 4  # then a new run after this many new stills
    adapt_max_stills: int = 20  # stills one run uses (the newest)
    adapt_bpp: str = "0.02,0.03"  # the live budgets the stills are encoded at to make training pairs
    adapt_request_s: float = 600.0  # ask a device with too few stills for a round, at most this often
    adapt_refine: bool = False  # refine adapted decodes with the (unadapted) diffusion refiner too
    calibration_max_bytes: int = 2_000_000  # larger calibration messages are rejected
    calibration_devices: str = ""  # comma-separated devices allowed to send stills ("" = every device)

    @property
    def session_expiry_s(self) -> int:
        """The MQTT session expiry to request (`validate` fills in the default for generated worker ids)."""
        return FIXED_ID_SESSION_EXPIRY_S if self.mqtt_session_expiry_s is None else int(self.mqtt_session_expiry_s)

    @property
    def calibration_allowed(self) -> frozenset[str] | None:
        """Devices that may send calibration stills; None: every device."""
        names = frozenset(d.strip() for d in self.calibration_devices.split(",") if d.strip())
        return names or None

    @property
    def mqtt_endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) from mqtt_url."""
        url = urlparse(self.mqtt_url or "")
        tls = url.scheme == "mqtts"
        return url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883), tls

    def validate(self) -> ServiceConfig:
        generated_id = not self.worker_id
        if generated_id:
            host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "decoder"
            self.worker_id = f"{host[:50]}-{os.getpid()}"
        if self.mqtt_session_expiry_s is None:
            self.mqtt_session_expiry_s = GENERATED_ID_SESSION_EXPIRY_S if generated_id else FIXED_ID_SESSION_EXPIRY_S
        if self.mqtt_session_expiry_s < 0:
            raise ConfigError(f"mqtt_session_expiry_s must be >= 0, got {self.mqtt_session_expiry_s}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.worker_id):
            raise ConfigError(f"worker_id must be [A-Za-z0-9_.-]{{1,64}}, got {self.worker_id!r}")
        if self.mqtt_url is None and self.grpc_addr is None and self.coap_addr is None:
            raise ConfigError("nothing to ingest: set mqtt_url, grpc_addr and/or coap_addr")
        if self.coap_addr is not None:
            host, sep, port = self.coap_addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ConfigError(f"coap_addr must be HOST:PORT, got {self.coap_addr!r}")
            if self.coap_tokens is None:
                self.coap_tokens = self.grpc_tokens
            if self.coap_tokens is None and not self.allow_insecure:
                raise ConfigError("CoAP needs coap_tokens (per-device keys; grpc_tokens will do) unless "
                                  "allow_insecure")
            if self.workers > 1:
                raise ConfigError("CoAP ingest runs in one worker process (it gathers each frame's slices in "
                                  "memory); use workers = 1 with coap_addr")
            for name in ("coap_max_datagram_bytes", "coap_max_pending_frames"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
            if not 0 < self.coap_max_deadline_s <= 3600 or self.coap_frame_ttl_s < self.coap_max_deadline_s:
                raise ConfigError("coap_max_deadline_s must be in (0, 3600] and coap_frame_ttl_s >= it")
        if self.mqtt_url is not None:
            scheme = urlparse(self.mqtt_url).scheme
            if scheme not in ("mqtt", "mqtts"):
                raise ConfigError(f"mqtt_url must start with mqtt:// or mqtts://, got {self.mqtt_url!r}")
            if scheme == "mqtts" and self.mqtt_ca is None:
                raise ConfigError("mqtts:// needs mqtt_ca (the CA that signed the broker's certificate)")
        if self.grpc_addr is not None and not self.allow_insecure:
            if self.grpc_cert is None or self.grpc_key is None:
                raise ConfigError("gRPC needs grpc_cert and grpc_key (or allow_insecure for local tests)")
            if self.grpc_tokens is None:
                raise ConfigError("gRPC needs grpc_tokens (per-device tokens) unless allow_insecure")
        for name in ("mqtt_ca", "mqtt_cert", "mqtt_key", "grpc_cert", "grpc_key", "grpc_client_ca",
                     "grpc_tokens", "coap_tokens", "models_dir"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{name}: {path} does not exist")
        for name in ("workers", "queue_size", "batch_size", "max_payload_bytes", "max_bitstream_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.queue_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must not exceed queue_size ({self.queue_size})")
        for name in ("realism", "refine_realism"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.backend not in ("auto", "torch", "onnxruntime"):
            raise ConfigError(f"backend must be auto, torch or onnxruntime, got {self.backend!r}")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps must be in 1..1000, got {self.steps}")
        if self.adapt:
            if self.adapt_minutes <= 0 or self.adapt_threads < 1:
                raise ConfigError("adapt_minutes must be > 0 and adapt_threads >= 1")
            if not 2 <= self.adapt_min_stills <= self.adapt_max_stills or self.adapt_rerun_stills < 1:
                raise ConfigError("need 2 <= adapt_min_stills <= adapt_max_stills and adapt_rerun_stills >= 1 "
                                  "(one still is held out to decide)")
            if self.mqtt_url is None:
                raise ConfigError("adapt needs mqtt_url: calibration stills arrive on their own MQTT channel")
            try:
                budgets = [float(b) for b in self.adapt_bpp.split(",") if b.strip()]
            except ValueError:
                budgets = []
            if not budgets or not all(0 < b <= 1 for b in budgets):
                raise ConfigError(f"adapt_bpp must be comma-separated budgets in (0, 1], got {self.adapt_bpp!r}")
            if self.calibration_max_bytes < 1:
                raise ConfigError("calibration_max_bytes must be >= 1")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format must be json or text, got {self.log_format!r}")
        return self


_PATH_FIELDS = {f.name for f in dataclasses.fields(ServiceConfig) if "Path" in str(f.type)}


def load_config(path: str | Path | None = None, **overrides) -> ServiceConfig:
    """Read a TOML config (flat keys, or under a [service] table), apply non-None overrides, validate."""
    values: dict = {}
    if path is not None:
        data = tomllib.loads(Path(path).read_text())
        values.update(data.get("service", data))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(ServiceConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    for name in _PATH_FIELDS & set(values):
        values[name] = Path(values[name])
    return ServiceConfig(**values).validate()


def config_to_dict(config: ServiceConfig) -> dict:
    """Plain-data form (paths as strings), for handing a config to a worker process."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
