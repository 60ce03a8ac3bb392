"""``make demo``: the whole system on one machine, end to end, with real pieces only.

    python -m mridc.firmware_sim.demo --out demo-out

1. a mosquitto broker on a free 127.0.0.1 port (no root; without mosquitto: gRPC, and it says so);
2. the cloud service, ``mridc-cloud serve``, as a subprocess with the shipped decoder;
3. one emulated low-bandwidth link per camera (``LinkEmulator``, default profile NB-IoT) in front of
   the broker or the gRPC server;
4. two or three simulated cameras: real ``EdgeAgent``s (durable SQLite queue, MQTT/gRPC transport,
   the real ``EdgeEncoder``) in this process, fed from the sample images and the sample clip in
   ``firmware_sim/demo_assets/``;
5. it waits until the cloud has acknowledged every accepted frame as stored, then compares each
   reconstruction with the frame the camera captured, and with the best AVIF that fits the same number
   of bytes (``mridc.bench.codecs``), and writes ``--out``:

   - ``report.json``, ``report.md``, ``index.html``: per frame device, sequence, bytes, bpp,
     capture-to-stored time, PSNR / MS-SSIM / perceptual distance for MRIDC and for AVIF;
   - ``side_by_side/``: original | MRIDC | AVIF at the same bytes, one PNG per frame;
   - ``cloud/``: the cloud service's store (``frames/<device>/*.png`` reconstructions + JSON sidecars);
   - ``originals/``, ``bitstreams/`` (the MRD bytes each camera sent), ``avif/`` (payload + decoded);
   - ``logs/``: broker, cloud service, edge agents and link events.

Every process it starts is stopped by its own PID (process group) at the end, on error and on Ctrl-C.
A missing piece (model files, mosquitto and gRPC, AVIF in Pillow, perceptual weights) is named and
the demo exits with status 2; nothing is ever made up. Exit status: 0 all frames delivered, decoded
and measured; 1 a frame was lost, rejected or timed out, or a process died; 2 a missing piece or a
bad option; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.firmware_sim.link import PROFILES, LinkProfile

log = logging.getLogger("mridc.sim.demo")

ASSETS_DIR = Path(__file__).resolve().parent / "demo_assets"
CLIP_NAME = "vtest_500-539.avi"  # 40 frames, 768x512, 10 fps (see demo_assets/ATTRIBUTION.txt)
SAMPLE_IMAGES = ("chelsea.png", "coffee.png", "rocket.jpg")  # fixed order: device sequence follows it
DEMO_MARKER = ".mridc-demo"  # a folder with this file is a previous demo output and may be replaced

LINK_PROFILES: dict[str, LinkProfile | None] = {
    **PROFILES,
    "64k": LinkProfile(64_000, 64_000, 300, 50, "64 kbit/s both ways, 300 ms latency"),
    "none": None,
}
DEFAULT_LINK = "nbiot"
DEFAULT_REALISM = 0.25  # a real diffusion pass at a fraction of the steps; 0 skips diffusion (fastest)
AVIF_CODEC = "avif-obu"  # the bench's strong AVIF baseline: AV1 bitstream, container rebuilt by the receiver

_FINAL = ("STORED", "DUPLICATE", "REJECTED")


class DemoError(RuntimeError):
    """The demo ran but something failed: a frame was lost or rejected, a process died, a timeout."""

    exit_code = 1


class MissingPiece(DemoError):
    """Something the demo needs is not on this machine; the message says what and how to get it."""

    exit_code = 2


# -- console --------------------------------------------------------------------------------------------------
class Console:
    """Progress lines with the time since start; everything also goes to logs/demo.log."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def say(self, stage: str, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {stage:<9} {message}"
        with self._lock:
            print(line, flush=True)
        log.info("%s %s", stage, message)


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
        return next((a for a in self.acks if a["status"] in _FINAL), None)


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


# -- pieces that must be present ------------------------------------------------------------------------------
def check_cloud_models(models_dir: Path) -> None:
    missing = [name for name in ("tokenizer.pt", "predictor.pt", "diffusion.pt", "edge/token_prior.npz")
               if not (models_dir / name).is_file()]
    if missing:
        raise MissingPiece(f"the cloud decoder's model files are missing in {models_dir}: {', '.join(missing)} "
                           "(they ship in models/; `make train` rebuilds them, MRIDC_MODELS points elsewhere)")


def load_edge_encoder(models_dir: Path | None, backend: str):
    from mridc.edge.encoder import EdgeEncoder

    try:
        return EdgeEncoder(models_dir=models_dir, backend=backend)
    except Exception as exc:  # any failure: the bundle is unusable
        raise MissingPiece(f"the edge encoder cannot load ({type(exc).__name__}: {exc}); the edge bundle is "
                           "models/edge/ (`make export` rebuilds it)") from exc


def load_avif():
    from mridc.bench.codecs import availability, make_codec

    reason = availability(AVIF_CODEC)
    if reason:
        raise MissingPiece(f"AVIF comparison impossible: {reason} (Pillow >= 11.3 has AVIF built in)")
    return make_codec(AVIF_CODEC)


def load_perceptual():
    try:
        from mridc.bench.perceptual import PerceptualDistance

        return PerceptualDistance(threads=1)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        raise MissingPiece(f"perceptual distance unavailable: {exc}. Or run with --no-perceptual.") from exc


# -- processes ------------------------------------------------------------------------------------------------
class CloudService:
    """``mridc-cloud serve`` (``python -m mridc.cloud.cli serve``) in its own process group."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.command = [sys.executable, "-m", "mridc.cloud.cli", "serve", *args]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.ready: dict | None = None
        self._ready_event = threading.Event()
        threading.Thread(target=self._read_stdout, name="cloud-stdout", daemon=True).start()

    def wait_ready(self, ready_timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready_event.wait(0.2):
            if self.proc.poll() is not None:
                raise DemoError(f"the cloud service exited with status {self.proc.returncode} before it was ready:\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"the cloud service was not ready after {ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("event") == "ready":
                self.ready = data
                self._ready_event.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        _stop_group(self.proc, timeout_s=30.0)
        if not self._log.closed:
            self._log.close()


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the process group this demo created for ``proc`` (its PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # The group may outlive its leader (a worker's children): make sure nothing of it is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


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


# -- measurement ----------------------------------------------------------------------------------------------
def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def quality(ref: np.ndarray, dec: np.ndarray, perceptual) -> dict:
    from mridc.bench.metrics import ms_ssim, psnr

    out = {"psnr": _finite(psnr(ref, dec)), "ms_ssim": _finite(ms_ssim(ref, dec))}
    if perceptual is not None:
        out["perceptual"] = _finite(perceptual(ref, dec))
    return out


def avif_at_same_bytes(frame: SentFrame, codec, perceptual, out: Path) -> dict:
    """The best AVIF (bench search over quality and downscale) within the MRIDC frame's bytes."""
    from PIL import Image

    from mridc.bench.codecs import BudgetTooSmall

    start = time.perf_counter()
    try:
        payload, decoded, info = codec.encode(frame.image, len(frame.bitstream) * 8)
    except BudgetTooSmall as exc:
        return {"fits": False, "error": str(exc), "search_s": round(time.perf_counter() - start, 2)}
    (out / "avif" / f"{frame.name}.avif-obu").write_bytes(payload)
    Image.fromarray(decoded).save(out / "avif" / f"{frame.name}.png")
    height, width = frame.image.shape[:2]
    return {
        "fits": True, "codec": codec.name, "label": codec.label, "bytes": len(payload), "bpp": round(len(payload) * 8 / (width * height), 5),
        "quality": info["quality"], "downscale": info["downscale"], "coded_size": info["coded_size"],
        "search_s": round(time.perf_counter() - start, 2), "png": f"avif/{frame.name}.png",
        **quality(frame.image, decoded, perceptual),
    }


def side_by_side(panels: list[tuple[np.ndarray | None, str]], height: int, width: int) -> np.ndarray:
    """Panels left to right, each with a caption strip above it; a missing panel is grey with its caption."""
    from PIL import Image, ImageDraw, ImageFont

    strip, gap = 24, 6
    canvas = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * gap, height + strip), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    for i, (image, caption) in enumerate(panels):
        x = i * (width + gap)
        if image is None:
            draw.rectangle([x, strip, x + width - 1, strip + height - 1], fill=(200, 200, 200))
        else:
            canvas.paste(Image.fromarray(image), (x, strip))
        draw.text((x + 4, 5), caption, fill="black", font=font)
    return np.asarray(canvas)


# -- reports --------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("mridc")]
    with_avif = [r for r in ok if r.get("avif") and "error" not in r["avif"]]
    summary = {
        "frames": len(rows),
        "bytes_total": sum(r["bytes"] for r in rows),
        "bpp_mean": _mean(r["bpp"] for r in rows),
        "capture_to_stored_s_mean": _mean(r["capture_to_stored_s"] for r in rows),
        "capture_to_stored_s_max": max((r["capture_to_stored_s"] for r in rows if r["capture_to_stored_s"]),
                                       default=None),
        "mridc": {k: _mean(r["mridc"].get(k) for r in ok) for k in ("psnr", "ms_ssim", "perceptual")},
        "avif": {k: _mean(r["avif"].get(k) for r in with_avif) for k in ("psnr", "ms_ssim", "perceptual")},
        "avif_frames": len(with_avif),
    }
    if with_avif:  # on the frames where both exist: who is better, frame by frame
        wins = {}
        for key, higher_better in (("psnr", True), ("ms_ssim", True), ("perceptual", False)):
            pairs = [(r["mridc"].get(key), r["avif"].get(key)) for r in with_avif]
            pairs = [(m, a) for m, a in pairs if m is not None and a is not None]
            if pairs:
                wins[key] = sum(1 for m, a in pairs if (m > a if higher_better else m < a))
        summary["mridc_better_than_avif"] = wins
    return summary


def _table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        m, a = r.get("mridc") or {}, r.get("avif") or {}
        avif_cells = ([_fmt(a.get("psnr")), _fmt(a.get("ms_ssim"), ".3f"), _fmt(a.get("perceptual"), ".3f"),
                       str(a.get("bytes", "")), f"1/{a['downscale']:g}, q{a['quality']}"]
                      if a and "error" not in a else ["no fit"] * 3 + ["-", "-"])
        out.append([r["device"], str(r["sequence"]), r["source"], f"{r['width']}x{r['height']}", str(r["bytes"]),
                    f"{r['bpp']:.4f}", _fmt(r["capture_to_stored_s"], ".1f"), _fmt(m.get("psnr")),
                    _fmt(m.get("ms_ssim"), ".3f"), _fmt(m.get("perceptual"), ".3f"), *avif_cells])
    return out


_HEADERS = ["device", "seq", "source", "size", "bytes", "bpp", "capture→stored s", "MRIDC PSNR", "MRIDC MS-SSIM",
            "MRIDC perc.", "AVIF PSNR", "AVIF MS-SSIM", "AVIF perc.", "AVIF bytes", "AVIF setting"]


def write_markdown(report: dict, path: Path) -> None:
    s, setup = report["summary"], report["setup"]
    d = report["delivery"]
    lines = [
        "# MRIDC Edge demo report", "",
        f"{report['created']}, {setup['machine']}. Command: `{report['command']}`", "",
        (f"{len(setup['cameras'])} cameras -> {setup['link']['description']} link each -> {setup['transport']} "
         f"-> cloud service (realism {setup['realism']}, seed {setup['seed']}). Target {setup['bpp']} bpp."), "",
        (f"Delivery: {d['stored']}/{d['accepted']} accepted frames stored, each exactly once: {d['exactly_once']}. "
         f"Frames resent: {d['resent']}, duplicate acks: {d['duplicate_acks']}, rejected: {d['rejected']}."), "",
        "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _table_rows(report["frames"])]
    m, a = s["mridc"], s["avif"]
    lines += [
        "", "## Means", "",
        "| | PSNR dB (higher better) | MS-SSIM (higher better) | perceptual (lower better) |", "|---|---|---|---|",
        f"| MRIDC | {_fmt(m['psnr'])} | {_fmt(m['ms_ssim'], '.3f')} | {_fmt(m['perceptual'], '.3f')} |",
        (f"| AVIF, same bytes ({s['avif_frames']} frames) | {_fmt(a['psnr'])} | {_fmt(a['ms_ssim'], '.3f')} | "
         f"{_fmt(a['perceptual'], '.3f')} |"), "",
        "MRIDC better than AVIF at the same bytes, frames: " + (", ".join(
            f"{k} {v}/{s['avif_frames']}" for k, v in s.get("mridc_better_than_avif", {}).items()) or "n/a") + ".", "",
        "## Notes", "",
        f"- Perceptual distance: {setup['perceptual']}.",
        (f"- AVIF: {setup['avif']}; best PSNR over quality and downscale factor (bench/codecs.py) with at most "
         "the MRIDC frame's bytes. Neither side counts the MQTT/protobuf envelope; the links carried "
         f"{report['link']['bytes_up']} bytes up in all (protocol included)."),
        ("- capture→stored: camera capture time to the cloud's PNG + sidecar on disk (encode, queue, link, "
         "broker, decode queue, decode, store); frames wait for each other in the cloud's decode queue."),
        "- Quality is measured against the frame the camera captured (the clip's frames are MJPG-decoded).",
        ("- Files: `side_by_side/` (original | MRIDC | AVIF), `cloud/frames/` (reconstructions + sidecars), "
         "`originals/`, `bitstreams/`, `avif/`, `logs/`."),
    ]
    path.write_text("\n".join(lines) + "\n")


def write_html(report: dict, path: Path) -> None:
    s = report["summary"]
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                   for cells in _table_rows(report["frames"]))
    figures = "".join(
        f'<figure><img src="{esc(r["side_by_side"])}" alt="{esc(r["name"])}"><figcaption>{esc(r["device"])} '
        f'#{r["sequence"]} ({esc(r["source"])}): original | MRIDC {r["bytes"]} B | AVIF at the same bytes'
        f"</figcaption></figure>" for r in report["frames"] if r.get("side_by_side"))
    d = report["delivery"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MRIDC Edge demo</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body>
<h1>MRIDC Edge demo</h1>
<p>{esc(report['created'])}. {len(report['setup']['cameras'])} cameras, {esc(report['setup']['link']['description'])}
link, {esc(report['setup']['transport'])}, realism {report['setup']['realism']}, target {report['setup']['bpp']} bpp.</p>
<p>Delivered: {d['stored']}/{d['accepted']} stored, exactly once: {d['exactly_once']}; resent {d['resent']},
duplicate acks {d['duplicate_acks']}, rejected {d['rejected']}.
Mean capture&rarr;stored {_fmt(s['capture_to_stored_s_mean'], '.1f')} s.</p>
<p>Means: MRIDC PSNR {_fmt(s['mridc']['psnr'])} dB, MS-SSIM {_fmt(s['mridc']['ms_ssim'], '.3f')}, perceptual
{_fmt(s['mridc']['perceptual'], '.3f')}; AVIF at the same bytes PSNR {_fmt(s['avif']['psnr'])} dB, MS-SSIM
{_fmt(s['avif']['ms_ssim'], '.3f')}, perceptual {_fmt(s['avif']['perceptual'], '.3f')}.
Perceptual: {esc(report['setup']['perceptual'])} (lower is closer).</p>
<table><tr>{head}</tr>{body}</table>
{figures}
</body></html>
"""
    path.write_text(page)


def print_summary(report: dict) -> None:
    s, d, setup = report["summary"], report["delivery"], report["setup"]
    print()
    print(f"MRIDC Edge demo: {d['accepted']} frames from {len(setup['cameras'])} cameras over "
          f"{setup['link']['description']} ({setup['transport']}), realism {setup['realism']}, "
          f"target {setup['bpp']} bpp")
    cols = ["device", "seq", "source", "bytes", "bpp", "deliv s", "PSNR", "MS-SSIM", "perc", "| AVIF", "MS-SSIM",
            "perc"]
    widths = [10, 3, 22, 5, 6, 7, 6, 7, 6, 6, 7, 6]
    print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))))
    for r in report["frames"]:
        m, a = r.get("mridc") or {}, r.get("avif") or {}
        has_avif = a and "error" not in a
        cells = [r["device"], str(r["sequence"]), r["source"][-22:], str(r["bytes"]), f"{r['bpp']:.4f}",
                 _fmt(r["capture_to_stored_s"], ".1f"), _fmt(m.get("psnr")), _fmt(m.get("ms_ssim"), ".3f"),
                 _fmt(m.get("perceptual"), ".3f"),
                 "| " + (_fmt(a.get("psnr")) if has_avif else "no fit"),
                 _fmt(a.get("ms_ssim"), ".3f") if has_avif else "-", _fmt(a.get("perceptual"), ".3f") if has_avif else "-"]
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    print(f"mean: MRIDC PSNR {_fmt(s['mridc']['psnr'])} dB, MS-SSIM {_fmt(s['mridc']['ms_ssim'], '.3f')}, perceptual "
          f"{_fmt(s['mridc']['perceptual'], '.3f')} | AVIF at the same bytes PSNR {_fmt(s['avif']['psnr'])} dB, "
          f"MS-SSIM {_fmt(s['avif']['ms_ssim'], '.3f')}, perceptual {_fmt(s['avif']['perceptual'], '.3f')}")
    if "mridc_better_than_avif" in s:
        wins = ", ".join(f"{k} {v}/{s['avif_frames']}" for k, v in s["mridc_better_than_avif"].items())
        print(f"MRIDC better than AVIF (frames): {wins}")
    print(f"delivery: {d['stored']}/{d['accepted']} stored, exactly once: {d['exactly_once']}, resent {d['resent']}, "
          f"duplicate acks {d['duplicate_acks']}, rejected {d['rejected']}; capture->stored mean "
          f"{_fmt(s['capture_to_stored_s_mean'], '.1f')} s, max {_fmt(s['capture_to_stored_s_max'], '.1f')} s; "
          f"{s['bytes_total']} MRD bytes, {report['link']['bytes_up']} bytes up the links")
    print(f"perceptual: {setup['perceptual']}")
    print(f"report: {report['out']}/report.md, {report['out']}/index.html; side by side: {report['out']}/side_by_side/")
    print(f"took {report['elapsed_s']:.0f} s")


# -- the run --------------------------------------------------------------------------------------------------
def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise MissingPiece(f"--out {out} exists and is not a demo output folder (no {DEMO_MARKER}); "
                               "choose another folder or empty it")
        shutil.rmtree(out)
    for sub in ("originals", "bitstreams", "avif", "side_by_side", "logs", "edge"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by python -m mridc.firmware_sim.demo; replaced by the next run\n")


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.console = Console()
        self.cameras: list[DemoCamera] = []
        self.links: dict[str, object] = {}
        self.frames: list[SentFrame] = []
        self._lock = threading.Lock()
        self._acked = 0
        self._jobs: dict[str, Future] = {}
        self._endpoints: tuple = (None, None, {})
        self.pids: dict[str, int] = {}  # processes this demo started, by role (in report.json)

    def say(self, stage: str, message: str) -> None:
        self.console.say(stage, message)

    def run(self, stack: contextlib.ExitStack) -> dict:
        args, out = self.args, self.out
        from mridc.shared.zoo import default_models_dir

        models_dir = Path(args.models_dir).resolve() if args.models_dir else default_models_dir()
        self.say("check", f"models in {models_dir}, sample assets in {ASSETS_DIR}")
        check_cloud_models(models_dir)
        encoder = load_edge_encoder(models_dir / "edge" if args.models_dir else None, args.backend)
        avif = load_avif()
        perceptual, why_not = None, "--no-perceptual"
        if not args.no_perceptual:
            try:
                perceptual = load_perceptual()
            except MissingPiece as exc:  # an optional metric: its weights live beside the checkout, not in it
                why_not = str(exc)
                self.say("check", f"perceptual distance skipped: {why_not}")
        perceptual_label = f"not measured ({why_not})" if perceptual is None else (
            perceptual.name + ("" if perceptual.standard else ": LPIPS-style unit-normalised MobileNetV2 ImageNet "
                               "feature distance, not the standard LPIPS"))
        plan = plan_shots(args.images, args.frames)
        total_planned = sum(len(s) for s in plan.values())
        if not total_planned:
            raise MissingPiece("nothing to send: --images 0 and --frames 0")
        self.say("plan", ", ".join(f"{dev}: {len(shots)} frame(s)" for dev, shots in plan.items()))

        # 1. the broker (or gRPC) ---------------------------------------------------------------------
        transport = args.transport
        broker = None
        if transport == "mqtt":
            from mridc.firmware_sim.broker import BrokerError, MosquittoBroker

            try:
                broker = MosquittoBroker()
            except BrokerError as exc:
                self.say("broker", f"{exc}")
                self.say("broker", "falling back to the gRPC transport (cameras -> link -> gRPC ingest)")
                transport = "grpc"
        if broker is not None:
            def stop_broker() -> None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(broker.log_path, out / "logs" / "mosquitto.log")
                broker.stop()

            stack.callback(stop_broker)  # before start: an interrupt inside start() must not leak it
            broker.start()
            self.pids["mosquitto"] = broker._proc.pid  # MosquittoBroker has no public pid
            self.say("broker", f"mosquitto listening on {broker.url} (pid {self.pids['mosquitto']})")

        # 2. the cloud service ------------------------------------------------------------------------
        serve = ["--out", str(out / "cloud"), "--worker-id", f"demo-cloud-{os.getpid()}", "--realism",
                 str(args.realism), "--seed", str(args.seed), "--log-format", "text"]
        if args.models_dir:
            serve += ["--models", str(models_dir)]
        serve += ["--mqtt", broker.url] if broker is not None else ["--grpc", "127.0.0.1:0", "--insecure"]
        self.say("cloud", f"starting mridc-cloud serve (realism {args.realism}); loading the decoder ...")
        cloud = CloudService(serve, out / "logs" / "cloud.log")
        stack.callback(cloud.stop)
        self.pids["cloud"] = cloud.proc.pid
        cloud.wait_ready()
        upstream = ("127.0.0.1", broker.port) if broker is not None else ("127.0.0.1", int(cloud.ready["grpc_port"]))
        self.say("cloud", f"ready (pid {cloud.proc.pid}), storing into {out / 'cloud'}")

        # 3. one emulated link per camera -------------------------------------------------------------
        from mridc.firmware_sim.link import LinkEmulator

        profile = LINK_PROFILES[args.link_profile]
        link_info = {"profile": args.link_profile,
                     "description": profile.description if profile else "no link emulation (loopback)",
                     **(profile.as_kwargs() if profile else {})}
        scheme = "mqtt" if broker is not None else "grpc"
        urls = {}
        for device_id in plan:
            if profile is None:
                urls[device_id] = f"{scheme}://{upstream[0]}:{upstream[1]}"
                continue
            link = LinkEmulator(upstream, **profile.as_kwargs(), seed=args.seed)
            stack.callback(link.stop)
            link.start()
            self.links[device_id] = link
            urls[device_id] = f"{scheme}://{link.address}"
        if profile is not None:
            self.say("link", f"{profile.description}: one emulated link per camera -> {upstream[0]}:{upstream[1]}")

        # 4. cameras ----------------------------------------------------------------------------------
        from mridc.edge.encoder import EdgeEncoder

        analysis = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avif")
        stack.callback(analysis.shutdown, wait=False, cancel_futures=True)

        def on_accepted(frame: SentFrame) -> None:
            with self._lock:
                self.frames.append(frame)
            self._jobs[frame.name] = analysis.submit(avif_at_same_bytes, frame, avif, perceptual, out)
            self.say("camera", f"{frame.device_id} #{frame.sequence} {frame.source} "
                               f"{frame.image.shape[1]}x{frame.image.shape[0]} -> {len(frame.bitstream)} B "
                               f"({frame.bpp:.4f} bpp, encode {frame.encode_s * 1000:.0f} ms), queued")

        def on_ack(frame: SentFrame, entry: dict) -> None:
            if entry["status"] in _FINAL and frame.final_ack is entry:
                with self._lock:
                    self._acked += 1
                    acked = self._acked
                self.say("delivery", f"{frame.device_id} #{frame.sequence} {entry['status']} after "
                                     f"{entry['t'] - frame.capture_time_us / 1e6:.1f} s "
                                     f"(acked {acked}/{total_planned})" + (f": {entry['reason']}" if entry["reason"] else ""))

        for device_id, shots in plan.items():
            camera_encoder = encoder if not self.cameras else EdgeEncoder(
                models_dir=models_dir / "edge" if args.models_dir else None, backend=args.backend)
            camera = DemoCamera(device_id, shots, url=urls[device_id], workdir=out / "edge", bpp=args.bpp,
                                fps=args.fps, encoder=camera_encoder, on_accepted=on_accepted, on_ack=on_ack)
            self.cameras.append(camera)
            stack.callback(camera.stop)
        self.say("camera", f"{len(self.cameras)} cameras, {args.bpp} bpp, {args.fps} frame/s each, "
                           f"{total_planned} frames in all")
        for camera in self.cameras:
            camera.start()

        # 5. wait until every accepted frame is acknowledged ------------------------------------------
        self._wait(cloud, broker, total_planned)
        with self._lock:
            frames = sorted(self.frames, key=lambda f: (f.device_id, f.sequence))
        stats = {c.device_id: c.agent.status() for c in self.cameras}
        link_stats = {d: dict(link.stats) for d, link in self.links.items()}
        # A clean stop (the last status says "offline, shutdown"); in parallel, each waits on its slow link.
        stoppers = [threading.Thread(target=c.stop, name=f"stop-{c.device_id}") for c in self.cameras]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(60)
        with (out / "logs" / "link_events.json").open("w") as fh:
            json.dump({d: link.events for d, link in self.links.items()}, fh, indent=1, default=str)

        # 6. measure ----------------------------------------------------------------------------------
        if not args.keep_running:
            cloud.stop()
            self.say("cloud", "stopped")
        self.say("measure", f"AVIF at the same bytes and quality metrics for {len(frames)} frames ...")
        rows = self._measure(frames, perceptual, out)
        delivery = self._delivery(frames, stats)
        report = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.executable).name, "-m", "mridc.firmware_sim.demo", *sys.argv[1:]]),
            "out": str(out),
            "setup": {
                "machine": _machine(), "transport": "MQTT 5 via mosquitto" if broker is not None else "gRPC",
                "transport_fallback": args.transport != transport, "link": link_info, "realism": args.realism,
                "seed": args.seed, "bpp": args.bpp, "fps": args.fps, "backend": args.backend,
                "models_dir": str(models_dir), "perceptual": perceptual_label,
                "avif": avif.label, "cameras": {d: [s.source for s in shots] for d, shots in plan.items()},
            },
            "processes": dict(self.pids),
            "delivery": delivery,
            "link": {"bytes_up": sum(s["bytes_up"] for s in link_stats.values()),
                     "bytes_down": sum(s["bytes_down"] for s in link_stats.values()), "per_camera": link_stats},
            "edge_status": stats,
            "frames": rows,
            "summary": summarise(rows),
            "elapsed_s": round(time.monotonic() - self.console.started, 1),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_markdown(report, out / "report.md")
        write_html(report, out / "index.html")
        self._endpoints = (broker, cloud, urls)
        return report

    def _wait(self, cloud: CloudService, broker, total_planned: int) -> None:
        deadline = time.monotonic() + self.args.timeout
        last_line = 0.0
        while True:
            capturing = any(c.capturing for c in self.cameras)
            with self._lock:
                accepted = len(self.frames)
                done = sum(1 for f in self.frames if f.final_ack)
            for camera in self.cameras:
                if camera.error:
                    raise DemoError(f"camera {camera.device_id} failed: {camera.error}")
            if not capturing and done == accepted:
                break
            if not cloud.alive:
                raise DemoError(f"the cloud service died (status {cloud.proc.returncode}):\n{cloud.log_tail()}")
            if broker is not None and not broker.running:
                raise DemoError(f"mosquitto died:\n{broker.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                with self._lock:
                    missing = [f"{f.device_id} #{f.sequence}" for f in self.frames if not f.final_ack]
                raise DemoError(f"timed out after {self.args.timeout:.0f} s: {done}/{accepted} accepted frames "
                                f"acknowledged; waiting for {', '.join(missing) or 'capture to finish'}. "
                                f"See {self.out / 'logs'} (cloud.log, demo.log); raise --timeout on a slow machine.")
            if now - last_line > 10.0:
                queued = sum(len(c.agent.queue) for c in self.cameras)
                self.say("progress", f"acked {done}/{total_planned}, accepted {accepted}, in camera queues {queued}"
                                     + (", cameras still capturing" if capturing else ", cloud decoding"))
                last_line = now
            time.sleep(0.2)
        refused = [f"{c.device_id}: {r}" for c in self.cameras for r in c.refused]
        if refused:
            raise DemoError("frames were not accepted by the camera queues: " + "; ".join(refused))
        self.say("delivery", f"all {accepted} accepted frames acknowledged")

    def _measure(self, frames: list[SentFrame], perceptual, out: Path) -> list[dict]:
        from PIL import Image

        from mridc.cloud.service.store import open_store_readonly

        store = open_store_readonly(out / "cloud")
        try:
            stored = {(r["device_id"], r["sequence"]): r for r in store.query()}
        finally:
            store.close()
        rows = []
        for frame in frames:
            Image.fromarray(frame.image).save(out / "originals" / f"{frame.name}.png")
            (out / "bitstreams" / f"{frame.name}.mrd").write_bytes(frame.bitstream)
            height, width = frame.image.shape[:2]
            ack = frame.final_ack or {}
            row = {
                "name": frame.name, "device": frame.device_id, "sequence": frame.sequence, "source": frame.source,
                "width": width, "height": height, "bytes": len(frame.bitstream), "bits": len(frame.bitstream) * 8,
                "bpp": round(len(frame.bitstream) * 8 / (width * height), 5), "encoder_bpp": round(frame.bpp, 5),
                "target_bpp": frame.target_bpp, "encode_s": round(frame.encode_s, 3),
                "ack": ack.get("status"), "ack_reason": ack.get("reason") or None,
                "acks": [a["status"] for a in frame.acks],
                "capture_to_ack_s": round(ack["t"] - frame.capture_time_us / 1e6, 3) if ack else None,
                "capture_to_stored_s": None, "link_time_s": None,
                "original": f"originals/{frame.name}.png", "bitstream": f"bitstreams/{frame.name}.mrd",
                "mridc": None, "avif": None, "side_by_side": None,
            }
            link = self.links.get(frame.device_id)
            if link is not None and link.up_bps:
                row["link_time_s"] = round(len(frame.bitstream) * 8 / link.up_bps, 3)
            record = stored.get((frame.device_id, frame.sequence))
            recon = None
            if record is not None:
                sidecar = json.loads((out / "cloud" / record["sidecar_path"]).read_text())
                row["capture_to_stored_s"] = round(record["stored_at"] - frame.capture_time_us / 1e6, 3)
                row["reconstruction"] = f"cloud/{record['png_path']}"
                row["cloud"] = {"timings": sidecar.get("timings"), "decode": sidecar.get("decode"),
                                "worker_id": sidecar.get("worker_id"), "transport": sidecar.get("transport"),
                                "bitstream_sha256_matches": sidecar.get("content_sha256")
                                == hashlib.sha256(frame.bitstream).hexdigest()}
                with Image.open(out / "cloud" / record["png_path"]) as im:
                    recon = np.asarray(im.convert("RGB"))
                if recon.shape != frame.image.shape:
                    raise DemoError(f"{frame.name}: reconstruction is {recon.shape}, the original {frame.image.shape}")
                row["mridc"] = quality(frame.image, recon, perceptual)
            try:
                row["avif"] = self._jobs[frame.name].result()
            except Exception as exc:  # noqa: BLE001 - recorded; the demo fails below
                row["avif"] = {"error": f"{type(exc).__name__}: {exc}"}
            avif_png = None
            if row["avif"] and "png" in row["avif"]:
                with Image.open(out / row["avif"]["png"]) as im:
                    avif_png = np.asarray(im.convert("RGB"))
            m, a = row["mridc"] or {}, row["avif"] or {}
            panels = [
                (frame.image, f"original {width}x{height}"),
                (recon, f"MRIDC {row['bytes']} B {row['bpp']:.4f} bpp  PSNR {_fmt(m.get('psnr'))}"
                        if recon is not None else "MRIDC: not stored"),
                (avif_png, f"AVIF {a.get('bytes')} B (1/{a.get('downscale', 1):g} size, q{a.get('quality')})  "
                           f"PSNR {_fmt(a.get('psnr'))}" if avif_png is not None
                 else "AVIF: no setting fits these bytes"),
            ]
            Image.fromarray(side_by_side(panels, height, width)).save(out / "side_by_side" / f"{frame.name}.png")
            row["side_by_side"] = f"side_by_side/{frame.name}.png"
            rows.append(row)
            self.say("measure", f"{frame.name}: MRIDC PSNR {_fmt(m.get('psnr'))}, AVIF PSNR {_fmt(a.get('psnr'))}")
        return rows

    def _delivery(self, frames: list[SentFrame], stats: dict) -> dict:
        from mridc.cloud.service.store import open_store_readonly

        store = open_store_readonly(self.out / "cloud")
        try:
            rows = store.query()
        finally:
            store.close()
        stored_keys = [(r["device_id"], r["sequence"]) for r in rows]
        sent_keys = {(f.device_id, f.sequence) for f in frames}
        statuses = [a["status"] for f in frames for a in f.acks]
        return {
            "accepted": len(frames),
            "stored": sum(1 for k in stored_keys if k in sent_keys),
            "exactly_once": sorted(stored_keys) == sorted(sent_keys) and len(set(stored_keys)) == len(stored_keys),
            "unexpected_in_store": [list(k) for k in stored_keys if k not in sent_keys],
            "missing_in_store": [list(k) for k in sorted(sent_keys) if k not in set(stored_keys)],
            "stored_acks": statuses.count("STORED"),
            "duplicate_acks": statuses.count("DUPLICATE"),
            "retry_later_acks": statuses.count("RETRY_LATER"),
            "rejected": statuses.count("REJECTED"),
            "resent": sum(s["forwarder"]["resent"] for s in stats.values()),
            "queue_left": sum(s["queue"]["depth"] for s in stats.values()),
        }

    def keep_running(self) -> None:
        broker, cloud, urls = self._endpoints
        print()
        print("--keep-running: the broker, the cloud service and the links stay up until Ctrl-C.")
        if broker is not None:
            print(f"  broker        {broker.url}   (mosquitto_sub -p {broker.port} -t 'mridc/v1/#' -v)")
        else:
            print(f"  gRPC ingest   127.0.0.1:{cloud.ready['grpc_port']}")
        for device_id, url in urls.items():
            print(f"  {device_id:<13} link {url}   (mridc-edge run --device-id {device_id} --transport {url} ...)")
        print(f"  frames        mridc-cloud frames --out {self.out / 'cloud'}")
        while cloud.alive:
            time.sleep(1.0)
        raise DemoError(f"the cloud service exited (status {cloud.proc.returncode})")


# -- command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    profiles = "; ".join(f"{name}: {p.description}" if p else f"{name}: plain loopback"
                         for name, p in LINK_PROFILES.items())
    parser = argparse.ArgumentParser(
        prog="python -m mridc.firmware_sim.demo",
        description="MRIDC Edge end to end on this machine: simulated cameras encode sample frames at an extreme "
                    "low bitrate, send them through emulated low-bandwidth links to a local MQTT broker (or gRPC), "
                    "the cloud service decodes and stores them, and a report compares every reconstruction with "
                    "the original and with AVIF at the same number of bytes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output folder; a previous demo output there is replaced (default demo-out)")
    parser.add_argument("--bpp", type=float, default=0.02, help="target bits per pixel for every camera (default 0.02)")
    parser.add_argument("--realism", type=float, default=DEFAULT_REALISM,
                        help=f"cloud decode realism, 0 (token completion + tokenizer decode, fastest) to 1 (full "
                             f"diffusion, slowest) (default {DEFAULT_REALISM})")
    parser.add_argument("--transport", choices=("mqtt", "grpc"), default="mqtt",
                        help="mqtt: cameras -> mosquitto -> cloud (falls back to grpc, with a message, when "
                             "mosquitto is not installed); grpc: cameras -> the cloud's gRPC ingest (default mqtt)")
    parser.add_argument("--link-profile", choices=list(LINK_PROFILES), default=DEFAULT_LINK,
                        help=f"the emulated link in front of each camera (default {DEFAULT_LINK}). {profiles}")
    parser.add_argument("--frames", type=int, default=6, metavar="N",
                        help="clip frames, spread over the 40-frame sample clip and dealt to two cameras (default 6)")
    parser.add_argument("--images", type=int, default=3, choices=range(len(SAMPLE_IMAGES) + 1), metavar="K",
                        help=f"sample photos for the photo camera, 0..{len(SAMPLE_IMAGES)} (default 3)")
    parser.add_argument("--fps", type=float, default=0.5,
                        help="frames per second each camera captures (0 = as fast as it encodes) (default 0.5)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="give up when the frames are not all acknowledged after S seconds (default 600)")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the report, keep the broker, links and cloud service up until Ctrl-C")
    parser.add_argument("--seed", type=int, default=0, help="decoder seed and link jitter seed (default 0)")
    parser.add_argument("--backend", choices=("onnx", "litert", "torch"), default="onnx",
                        help="edge encoder backend (default onnx)")
    parser.add_argument("--models-dir", metavar="DIR", help="models folder (default $MRIDC_MODELS or models/)")
    parser.add_argument("--no-perceptual", action="store_true",
                        help="skip the perceptual distance (it needs MobileNetV2 ImageNet weights, see bench/perceptual.py)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.bpp <= 1:
        parser.error("--bpp must be in (0, 1]")
    if not 0 <= args.realism <= 1:
        parser.error("--realism must be in [0, 1]")
    if not 0 <= args.frames <= 40:
        parser.error("--frames must be 0..40 (the sample clip has 40 frames)")
    if args.fps < 0 or args.timeout <= 0:
        parser.error("--fps must be >= 0 and --timeout > 0")


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = Path(args.out).resolve()
    try:
        prepare_out(out)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.INFO, filename=out / "logs" / "demo.log",
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C, kill and a closed terminal all end in the same cleanup (even where the shell that
        # started us in the background set SIGINT to "ignore").
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGHUP, _raise_interrupt)
    demo = Demo(args)
    try:
        with contextlib.ExitStack() as stack:
            report = demo.run(stack)
            if args.keep_running:
                print_summary(report)
                demo.keep_running()
            demo.say("cleanup", "stopping the links and the processes it started")
        demo.say("cleanup", "done: every process the demo started has stopped")
    except KeyboardInterrupt:
        print("\ndemo: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        print(f"demo: logs in {out / 'logs'}; every process it started has been stopped", file=sys.stderr)
        return exc.exit_code
    if not args.keep_running:
        print_summary(report)
    problems = []
    d = report["delivery"]
    if not d["exactly_once"] or d["stored"] != d["accepted"]:
        problems.append(f"{d['stored']}/{d['accepted']} frames stored exactly once")
    if d["rejected"]:
        problems.append(f"{d['rejected']} frame(s) rejected by the cloud")
    if any(r["mridc"] is None for r in report["frames"]):
        problems.append("some frames have no reconstruction")
    if any(r["avif"] is None or "error" in r["avif"] and r["avif"].get("fits") is not False
           for r in report["frames"]):
        problems.append("the AVIF comparison failed for some frames (see report.json)")
    if problems:
        print(f"demo: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
