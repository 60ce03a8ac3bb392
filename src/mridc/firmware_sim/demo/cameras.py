"""The simulated cameras: what they capture (sample photos, clip frames) and the real edge agent that sends it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.shared.protocol import FINAL_ACK_STATUSES

from .errors import MissingPiece

log = logging.getLogger("mridc.sim.demo")

# The sample assets stay in firmware_sim/demo_assets (package data of mridc.firmware_sim).
ASSETS_DIR = Path(__file__).resolve().parents[1] / "demo_assets"
CLIP_NAME = "vtest_500-539.avi"  # 40 frames, 768x512, 10 fps (see demo_assets/ATTRIBUTION.txt)
SAMPLE_IMAGES = ("chelsea.png", "coffee.png", "rocket.jpg")  # fixed order: device sequence follows it
FINAL_STATUSES = {status.name for status in FINAL_ACK_STATUSES}  # acks are recorded by status name


# -- what the cameras capture ---------------------------------------------------------------------------------
@dataclass
class Shot:
    """One frame a camera will capture: the image exactly as it is handed to the encoder."""

    device_id: str
    source: str  # "chelsea.png" or "vtest_500-539.avi#14"
    image: np.ndarray


@dataclass
class SentFrame:
    """A frame the camera's queue accepted, and what happened to it."""

    device_id: str
    sequence: int
    source: str
    image: np.ndarray
    capture_time_us: int
    bitstream: bytes
    bpp: float
    target_bpp: float
    encode_s: float
    acks: list[dict] = field(default_factory=list)  # {"status", "reason", "t"} in arrival order

    @property
    def name(self) -> str:
        return f"{self.device_id}_{self.sequence:06d}"

    @property
    def final_ack(self) -> dict | None:
        return next((a for a in self.acks if a["status"] in FINAL_STATUSES), None)


def read_frames(uri: str, indices: list[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """Frames from an image file or a video through the edge capture code (RGB uint8), by index."""
    from mridc.edge.capture import CaptureError, open_source

    wanted = None if indices is None else set(indices)
    out = []
    try:
        source = open_source(uri, fps=0.0)
        for frame in source:
            if wanted is None or frame.index in wanted:
                out.append((frame.name, frame.image))
            if wanted is not None and frame.index >= max(wanted):
                break
    except CaptureError as exc:
        raise MissingPiece(f"cannot read {uri}: {exc}") from exc
    if wanted is not None and len(out) != len(wanted):
        raise MissingPiece(f"{uri} has fewer frames than the demo needs ({len(out)} of {len(wanted)} read)")
    return out


def plan_shots(images: int, frames: int, assets: Path = ASSETS_DIR) -> dict[str, list[Shot]]:
    """Cameras and what each captures: ``cam-photos`` the sample images, ``cam-yard-a``/``-b`` the clip
    frames (spread evenly over the 40-frame clip, dealt alternately). Cameras with nothing are left out."""
    cameras: dict[str, list[Shot]] = {}
    for name in SAMPLE_IMAGES[:images]:
        path = assets / name
        if not path.is_file():
            raise MissingPiece(f"sample image {path} is missing (it ships in the repository: git checkout it)")
        [(_, image)] = read_frames(str(path))
        cameras.setdefault("cam-photos", []).append(Shot("cam-photos", name, image))
    if frames:
        clip = assets / CLIP_NAME
        if not clip.is_file():
            raise MissingPiece(f"sample clip {clip} is missing (it ships in the repository: git checkout it)")
        indices = sorted({round(float(i)) for i in np.linspace(0, 39, frames)}) if frames > 1 else [0]
        for n, (_, image) in enumerate(read_frames(str(clip), indices)):
            device_id = "cam-yard-a" if n % 2 == 0 else "cam-yard-b"
            cameras.setdefault(device_id, []).append(Shot(device_id, f"{CLIP_NAME}#{indices[n]}", image))
    return cameras


def load_edge_encoder(models_dir: Path | None, backend: str):
    from mridc.edge.encoder import EdgeEncoder

    try:
        return EdgeEncoder.from_bundle(models_dir=models_dir, backend=backend)
    except Exception as exc:  # any failure: the bundle is unusable
        raise MissingPiece(f"the edge encoder cannot load ({type(exc).__name__}: {exc}); the edge bundle is "
                           "models/edge/ (`make export` rebuilds it)") from exc


class _RecordingEncoder:
    """The real encoder, plus the last result, so the demo knows the exact bytes each frame became."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.last = None
        self.last_s = 0.0

    def encode(self, image, **kwargs):
        start = time.perf_counter()
        self.last = self.encoder.encode(image, **kwargs)
        self.last_s = time.perf_counter() - start
        return self.last


class DemoCamera:
    """One simulated camera: an ``EdgeAgent`` built from a device config, as ``mridc-edge run`` builds it."""

    def __init__(self, device_id: str, shots: list[Shot], *, url: str, workdir: Path, bpp: float, fps: float,
                 encoder, on_accepted: Callable[[SentFrame], None], on_ack: Callable[[SentFrame, dict], None]) -> None:
        from mridc.edge.agent import build_agent
        from mridc.edge.config import DeviceConfig

        config = DeviceConfig()
        config.device.id = device_id
        config.transport.url = url
        # Generous: the cloud decodes every camera's frames one after another on two shared cores.
        config.transport.ack_timeout_s = 300.0
        config.transport.backoff_max_s = 5.0
        config.queue.path = str(workdir / device_id / "queue.db")
        config.encoder.bpp = bpp
        config.encoder.min_bpp = min(config.encoder.min_bpp, bpp)
        config.validate()
        (workdir / device_id).mkdir(parents=True, exist_ok=True)
        self.device_id, self.shots, self.fps, self.url = device_id, shots, fps, url
        self.encoder = _RecordingEncoder(encoder)
        self.agent = build_agent(config, self.encoder, source=[])
        self.sent: dict[int, SentFrame] = {}
        self.refused: list[str] = []
        self._early_acks: dict[int, list] = {}  # an ack that beat the capture thread's bookkeeping
        self._sent_lock = threading.Lock()
        self._stopped = False
        self.error: str | None = None
        self._on_accepted, self._on_ack = on_accepted, on_ack
        forward = self.agent.transport.on_ack  # the agent's Forwarder: removes acked frames from the queue

        def on_ack_wrapper(ack) -> None:
            forward(ack)
            self._ack(ack)

        self.agent.transport.on_ack = on_ack_wrapper
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._capture, name=f"camera-{device_id}", daemon=True)

    def _ack(self, ack) -> None:
        from mridc.v1 import mridc_pb2

        entry = {"status": mridc_pb2.FrameAck.Status.Name(ack.status), "reason": ack.reason, "t": time.time()}
        with self._sent_lock:
            frame = self.sent.get(ack.sequence)
            if frame is None:
                self._early_acks.setdefault(ack.sequence, []).append(entry)
                return
            frame.acks.append(entry)
        self._on_ack(frame, entry)

    def start(self) -> None:
        self.agent.start()
        self._thread.start()

    def _capture(self) -> None:
        started = time.monotonic()
        try:
            for i, shot in enumerate(self.shots):
                if self._stop.wait(max(0.0, started + i / self.fps - time.monotonic()) if self.fps > 0 else 0):
                    return
                capture_time_us = time.time_ns() // 1000
                put = self.agent.submit(shot.image, capture_time_us)
                if put is None or not put.accepted:
                    self.refused.append(f"{shot.source}: {'encode failed' if put is None else put.reason}")
                    continue
                result = self.encoder.last
                frame = SentFrame(self.device_id, put.sequence, shot.source, shot.image, capture_time_us,
                                  bytes(result.bitstream), float(result.bpp), self.agent.current_bpp,
                                  self.encoder.last_s)
                with self._sent_lock:
                    self.sent[put.sequence] = frame
                    early = self._early_acks.pop(put.sequence, [])
                    frame.acks.extend(early)
                self._on_accepted(frame)
                for entry in early:
                    self._on_ack(frame, entry)
        except Exception as exc:  # reported by the main thread
            log.exception("%s: capture failed", self.device_id)
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def capturing(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self.agent.stop()
        self.agent.queue.close()
