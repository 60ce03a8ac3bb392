"""A real video codec on a fixed-camera sequence, at the frame interval and mean byte budget of the MRIDC stream.

The baseline a benchmark compares against: x264, x265 or SVT-AV1 through ffmpeg, set up the way a careful
user would for a low-delay camera link::

    result = encode_sequence(frames, "x264", mean_bytes_per_frame=400, interval_s=1.0)
    result.bytes_per_frame, result.decoded, result.total_bytes, result.settings

Settings (``_encoder_args``): one GOP for the whole clip (keyint = number of frames, scene-cut I-frames off),
P-frames only (``-bf 0``, no B-frames or reordering), one-pass rate control in bitrate mode with the target
``mean_bytes_per_frame * 8 / interval_s`` bit/s at ``1 / interval_s`` frames per second (a rational, ``1/5``
for 0.2 fps), low-latency tuning where the encoder has it, ``yuv420p``, one thread (deterministic).

Bytes are counted honestly, on the codec's own elementary stream, no container:

- H.264 and HEVC are written as Annex B byte streams (``.h264``/``.hevc``: start codes, SPS/PPS/VPS in the
  first access unit); AV1 as the Section 5 low-overhead OBU stream (``.obu``; each temporal unit starts with a
  2-byte temporal-delimiter OBU, which is counted). IVF would add 32 + 12 bytes per frame, so it is not used.
- Encoder-identification metadata a decoder does not need is not sent: x264's version/options SEI is removed
  with ``-bsf:v filter_units=remove_types=6`` (the encoder's settings as text), x265 is told ``info=0``.
  SVT-AV1 writes none.
- ``bytes_per_frame`` are ffprobe's packet sizes (``-show_packets``) of that stream; their sum equals the
  stream's file size, and ``encode_sequence`` checks that it does.
- When the coded size differs from the original (odd size padded, or ``scale`` < 1), the receiver needs the
  original width and height once per sequence: ``side_bytes`` = 4 (big-endian u16 each, as codecs.py does for
  stills). ``total_bytes = sum(bytes_per_frame) + side_bytes``; the mean is ``total_bytes / len(frames)``.

x264 and x265 take the bitrate in whole kbit/s (ffmpeg divides by 1000 and truncates; x264 refuses 0). At
1 fps that is a step of 125 bytes/frame, and 300 bytes/frame at 0.2 fps (480 bit/s) cannot be asked for at
all. When the whole-kbit/s rounding of the bitrate asked for is off by more than 5 %, the encoder is given a
clock ``rate_clock`` = k times faster (frame rate ``k / interval_s``, bitrate ``k`` times higher: the same
bits per frame), with k the smallest integer that brings the rounding within 5 %. The stream's timing then
says ``k / interval_s`` fps, which nothing here uses; ``attempts`` records k. SVT-AV1 takes bit/s (k = 1).

SVT-AV1 1.4 (Debian 12) in low-delay mode (``pred-struct=1``) supports CBR only and presets 8-13, and warns
that low delay is "work-in-progress ... should not be used for benchmarking"; ``result.warnings`` says so.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .codecs import SIZE_TRAILER, downscale, upscale
from .metrics import psnr

VIDEO_CODECS = ("x264", "x265", "svtav1")
# codec name -> (ffmpeg encoder, raw elementary-stream muxer/demuxer, file extension)
_FORMATS = {"x264": ("libx264", "h264", ".h264"), "x265": ("libx265", "hevc", ".hevc"),
            "svtav1": ("libsvtav1", "obu", ".obu")}
DEFAULT_PRESETS = {"x264": "veryslow", "x265": "slow", "svtav1": "8"}
# A re-encode is done when the achieved mean is off the target by more than this (relative); at most
# MAX_CORRECTIONS of them, each asking for bitrate * target / achieved. The closest attempt is kept.
RATE_TOLERANCE = 0.25
MAX_CORRECTIONS = 2
_KBPS_ROUNDING = 0.05
_STDERR_TAIL = 1500
_SWS = "bicubic+accurate_rnd+full_chroma_int"


class VideoCodecError(ValueError):
    """ffmpeg/ffprobe failed or gave something unexpected, or the input frames are not a valid sequence."""


@dataclass
class SequenceResult:
    codec: str
    bytes_per_frame: list[int]       # ffprobe packet sizes of the elementary stream, in frame order
    decoded: list[np.ndarray]        # HxWx3 uint8 at the original size
    total_bytes: int                 # sum(bytes_per_frame) + side_bytes
    settings: str                    # the exact ffmpeg command line of the kept encode
    stream: bytes = b""              # the elementary stream itself
    side_bytes: int = 0              # original-size header when coded size != original size
    frame_types: list[str] = field(default_factory=list)  # decoded pict_type per frame (I, P, ...)
    original_size: tuple[int, int] = (0, 0)  # width, height
    coded_size: tuple[int, int] = (0, 0)
    scale: float = 1.0
    interval_s: float = 1.0
    target_bytes_per_frame: float = 0.0
    attempts: list[dict] = field(default_factory=list)  # every encode tried, the kept one marked
    warnings: list[str] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)  # best_sequence: scale, mean bytes, mean PSNR of each

    @property
    def mean_bytes_per_frame(self) -> float:
        return self.total_bytes / max(1, len(self.bytes_per_frame))

    def psnr_per_frame(self, frames: list[np.ndarray]) -> list[float]:
        return [psnr(ref, dec) for ref, dec in zip(frames, self.decoded, strict=True)]

    def mean_psnr(self, frames: list[np.ndarray]) -> float:
        return float(np.mean(self.psnr_per_frame(frames)))

    def info(self) -> dict:
        """JSON-ready summary (no pixels, no stream)."""
        width, height = self.original_size
        return {
            "codec": self.codec, "total_bytes": self.total_bytes, "side_bytes": self.side_bytes,
            "bytes_per_frame": self.bytes_per_frame, "mean_bytes_per_frame": self.mean_bytes_per_frame,
            "target_bytes_per_frame": self.target_bytes_per_frame,
            "mean_bpp": self.mean_bytes_per_frame * 8 / (width * height) if width * height else None,
            "frame_types": self.frame_types, "original_size": list(self.original_size),
            "coded_size": list(self.coded_size), "scale": self.scale, "interval_s": self.interval_s,
            "settings": self.settings, "attempts": self.attempts, "warnings": self.warnings, "tried": self.tried,
        }


@functools.lru_cache(maxsize=1)
def _ffmpeg_encoders() -> tuple[str | None, frozenset[str]]:
    """(reason ffmpeg cannot be used or None, names of its video encoders); probed once."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH (apt-get install ffmpeg)", frozenset()
    try:
        out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ffmpeg -encoders failed: {exc}", frozenset()
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0].startswith("V"):
            names.add(parts[1])
    return None, frozenset(names)


def video_availability(name: str) -> str | None:
    """None if the video codec can run here, else a one-line reason."""
    if name not in _FORMATS:
        return f"unknown video codec {name!r}; known: {', '.join(VIDEO_CODECS)}"
    reason, encoders = _ffmpeg_encoders()
    if reason:
        return f"{name} skipped: {reason}"
    encoder = _FORMATS[name][0]
    if encoder not in encoders:
        return f"{name} skipped: this ffmpeg has no {encoder} encoder compiled in"
    return None


def _even(value: float) -> int:
    return max(2, round(value / 2) * 2)


def _check_frames(frames: list[np.ndarray]) -> tuple[int, int]:
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise VideoCodecError("encode_sequence needs a non-empty list of frames")
    first = np.asarray(frames[0])
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoCodecError(f"frame {i}: expected HxWx3 uint8 RGB, got {frame.shape} {frame.dtype}")
        if frame.shape != first.shape:
            raise VideoCodecError(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is "
                                  f"{first.shape[1]}x{first.shape[0]}: all frames must have one size")
    height, width = first.shape[:2]
    return width, height


def _coded_frames(frames: list[np.ndarray], width: int, height: int, scale: float
                  ) -> tuple[list[np.ndarray], int, int]:
    """Frames at the size the encoder sees: yuv420p needs even width and height.

    scale == 1: an odd width/height is padded by one column/row (edge pixels repeated) and the decoded
    frames are cropped back. scale < 1: the frames are downscaled (Lanczos) straight to the nearest even size.
    """
    if scale == 1.0:
        cw, ch = width + width % 2, height + height % 2
        if (cw, ch) == (width, height):
            return [np.ascontiguousarray(f) for f in frames], cw, ch
        pad = ((0, ch - height), (0, cw - width), (0, 0))
        return [np.pad(f, pad, mode="edge") for f in frames], cw, ch
    cw, ch = _even(width * scale), _even(height * scale)
    return [downscale(np.asarray(f), cw, ch) for f in frames], cw, ch


def _rate_clock(bitrate_bps: float, codec: str) -> int:
    """k for the first request (see the module docstring on whole kbit/s); corrections keep the same k."""
    if codec == "svtav1":
        return 1
    kbps = bitrate_bps / 1000.0
    for k in range(1, 10001):
        whole = round(k * kbps)
        if whole >= 1 and abs(whole / (k * kbps) - 1.0) <= _KBPS_ROUNDING:
            return k
    raise VideoCodecError(f"{codec}: cannot express {bitrate_bps:.3f} bit/s in whole kbit/s")


def _rate_arg(bitrate_bps: float, codec: str, k: int) -> str:
    if codec == "svtav1":
        return str(max(1, round(bitrate_bps)))
    return f"{max(1, round(k * bitrate_bps / 1000.0))}k"


def _encoder_args(codec: str, n: int, preset: str | None) -> list[str]:
    preset = str(preset if preset is not None else DEFAULT_PRESETS[codec])
    if codec == "x264":
        # zerolatency: no lookahead, no mbtree, no B-frames; scenecut=0: the only I-frame is the first.
        return ["-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-threads", "1", "-bf", "0",
                "-g", str(n), "-x264-params", f"scenecut=0:keyint={n}:min-keyint={n}:bframes=0",
                "-bsf:v", "filter_units=remove_types=6"]
    if codec == "x265":
        return ["-c:v", "libx265", "-preset", preset, "-tune", "zerolatency", "-bf", "0", "-g", str(n),
                "-x265-params", (f"scenecut=0:bframes=0:keyint={n}:min-keyint={n}:open-gop=0:info=0:"
                                 "pools=1:frame-threads=1:log-level=error")]
    # SVT-AV1 1.4: pred-struct=1 is low delay (P-frames, no reordering); it supports CBR (rc=2) only.
    return ["-c:v", "libsvtav1", "-preset", preset, "-bf", "0", "-g", str(n),
            "-svtav1-params", "pred-struct=1:rc=2:scd=0:lp=1"]


def _run(cmd: list[str], what: str, stdin: bytes | None = None, timeout: float = 600) -> bytes:
    env = dict(os.environ, SVT_LOG="1")  # SVT-AV1 logs to stderr on its own: errors only
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=env, check=False)
    except FileNotFoundError as exc:
        raise VideoCodecError(f"{what}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise VideoCodecError(f"{what}: timed out after {timeout:.0f} s: {shlex.join(cmd)}") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace")[-_STDERR_TAIL:].strip()
        raise VideoCodecError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return proc.stdout


def _encode_once(raw: bytes, codec: str, n: int, cw: int, ch: int, interval: Fraction, bitrate_bps: float,
                 k: int, preset, path: str) -> dict:
    muxer = _FORMATS[codec][1]
    rate = _rate_arg(bitrate_bps, codec, k)
    fps = k / interval
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{cw}x{ch}", "-framerate", f"{fps.numerator}/{fps.denominator}",
           "-i", "pipe:0", "-sws_flags", _SWS, "-pix_fmt", "yuv420p",
           *_encoder_args(codec, n, preset), "-b:v", rate, "-f", muxer, path]
    _run(cmd, f"{codec} encode", stdin=raw)
    with open(path, "rb") as fh:
        stream = fh.read()
    probe = _run(["ffprobe", "-v", "error", "-f", muxer, "-show_packets", "-show_frames",
                  "-show_entries", "packet=size,flags:frame=pict_type", "-of", "json", path], f"{codec} ffprobe")
    parsed = json.loads(probe or b"{}")
    items = parsed.get("packets_and_frames") or (parsed.get("packets", []) + parsed.get("frames", []))
    sizes = [int(p["size"]) for p in items if p.get("type", "packet") == "packet" and "size" in p]
    types = [str(f.get("pict_type", "?")) for f in items if f.get("type") == "frame" or "pict_type" in f]
    if sum(sizes) != len(stream):
        raise VideoCodecError(f"{codec}: ffprobe packet sizes sum to {sum(sizes)} bytes but the stream has "
                              f"{len(stream)}; refusing to report per-frame sizes")
    if len(sizes) != n:
        raise VideoCodecError(f"{codec}: {len(sizes)} packets in the stream for {n} frames")
    return {"command": shlex.join(cmd), "stream": stream, "sizes": sizes, "types": types,
            "requested_bps": bitrate_bps, "rate_clock": k, "b:v": rate}


def _decode(path: str, codec: str, n: int, cw: int, ch: int) -> list[np.ndarray]:
    muxer = _FORMATS[codec][1]
    out = _run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", muxer, "-i", path,
                "-fps_mode", "passthrough", "-sws_flags", _SWS, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
               f"{codec} decode")
    size = cw * ch * 3
    if len(out) != n * size:
        raise VideoCodecError(f"{codec} decode: got {len(out) / size:.2f} frames of {cw}x{ch}, expected {n}")
    return [np.frombuffer(out, np.uint8, size, i * size).reshape(ch, cw, 3).copy() for i in range(n)]


def encode_sequence(frames: list[np.ndarray], codec: str, *, mean_bytes_per_frame: float, interval_s: float = 1.0,
                    preset=None, workdir=None, scale: float = 1.0) -> SequenceResult:
    """Encode ``frames`` (HxWx3 uint8 RGB, one size) as one low-delay GOP and decode them back.

    Odd sizes are padded to even (edge pixels repeated; decoded frames cropped back); with ``scale`` < 1 the
    frames are downscaled with Lanczos to the nearest even size and the decoded ones upscaled with Lanczos to
    the original size. If the achieved mean bytes/frame is more than ``RATE_TOLERANCE`` off the target, up to
    ``MAX_CORRECTIONS`` re-encodes ask for bitrate * target / achieved; the closest attempt is kept, all are in
    ``attempts``. ``workdir``: where the stream file is written (a temporary directory if None, removed after).
    """
    if codec not in _FORMATS:
        raise VideoCodecError(f"unknown video codec {codec!r}; known: {', '.join(VIDEO_CODECS)}")
    reason = video_availability(codec)
    if reason:
        raise VideoCodecError(reason)
    if not (mean_bytes_per_frame > 0 and math.isfinite(mean_bytes_per_frame)):
        raise VideoCodecError(f"mean_bytes_per_frame must be positive, got {mean_bytes_per_frame!r}")
    if not (interval_s > 0 and math.isfinite(interval_s)):
        raise VideoCodecError(f"interval_s must be positive, got {interval_s!r}")
    if not (0 < scale <= 1.0):
        raise VideoCodecError(f"scale must be in (0, 1], got {scale!r}")
    width, height = _check_frames(frames)
    n = len(frames)
    coded, cw, ch = _coded_frames(frames, width, height, float(scale))
    raw = b"".join(f.tobytes() for f in coded)
    side = SIZE_TRAILER.size if (cw, ch) != (width, height) else 0
    interval = Fraction(interval_s).limit_denominator(1_000_000)
    target_stream = mean_bytes_per_frame * n - side  # bytes the elementary stream may take
    bitrate = max(target_stream, 1.0) / n * 8 / float(interval)

    clock = _rate_clock(bitrate, codec)
    tmp = tempfile.mkdtemp(prefix="mridc-video-", dir=workdir)
    try:
        attempts: list[dict] = []
        for i in range(1 + MAX_CORRECTIONS):
            path = os.path.join(tmp, f"attempt{i}{_FORMATS[codec][2]}")
            att = _encode_once(raw, codec, n, cw, ch, interval, bitrate, clock, preset, path)
            att["path"] = path
            att["mean_bytes_per_frame"] = (len(att["stream"]) + side) / n
            attempts.append(att)
            ratio = att["mean_bytes_per_frame"] / mean_bytes_per_frame
            if abs(ratio - 1.0) <= RATE_TOLERANCE:
                break
            bitrate *= 1.0 / ratio
        best = min(attempts, key=lambda a: abs(math.log(a["mean_bytes_per_frame"] / mean_bytes_per_frame)))
        small = _decode(best["path"], codec, n, cw, ch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if scale == 1.0:
        decoded = [f[:height, :width] if (cw, ch) != (width, height) else f for f in small]
        decoded = [np.ascontiguousarray(f) for f in decoded]
    else:
        decoded = [upscale(f, width, height) for f in small]
    warnings = []
    if codec == "svtav1":
        warnings.append("SVT-AV1 1.4 low-delay mode is CBR-only, presets 8-13, and flagged by SVT as "
                        "work-in-progress, not for benchmarking")
    return SequenceResult(
        codec=codec, bytes_per_frame=best["sizes"], decoded=decoded, total_bytes=len(best["stream"]) + side,
        settings=best["command"], stream=best["stream"], side_bytes=side, frame_types=best["types"],
        original_size=(width, height), coded_size=(cw, ch), scale=float(scale), interval_s=float(interval_s),
        target_bytes_per_frame=float(mean_bytes_per_frame),
        attempts=[{"command": a["command"], "requested_bps": a["requested_bps"], "rate_clock": a["rate_clock"],
                   "b:v": a["b:v"], "mean_bytes_per_frame": a["mean_bytes_per_frame"], "kept": a is best}
                  for a in attempts],
        warnings=warnings)


def best_sequence(frames: list[np.ndarray], codec: str, mean_bytes_per_frame: float, interval_s: float = 1.0,
                  scales=(1.0, 0.75, 0.5), **kw) -> SequenceResult:
    """Try each downscale; the best mean PSNR (lab.metrics.psnr) among results whose mean bytes/frame is at
    most 10 % above the target, or the smallest result if none is. ``result.tried`` lists every scale."""
    results = []
    for scale in scales:
        res = encode_sequence(frames, codec, mean_bytes_per_frame=mean_bytes_per_frame, interval_s=interval_s,
                              scale=scale, **kw)
        results.append((res, res.mean_psnr(frames)))
    fitting = [(r, p) for r, p in results if r.mean_bytes_per_frame <= 1.10 * mean_bytes_per_frame]
    if fitting:
        best = max(fitting, key=lambda rp: rp[1])[0]
    else:
        best = min(results, key=lambda rp: rp[0].total_bytes)[0]
    best.tried = [{"scale": r.scale, "mean_bytes_per_frame": r.mean_bytes_per_frame,
                                   "mean_psnr": p} for r, p in results]
    return best
