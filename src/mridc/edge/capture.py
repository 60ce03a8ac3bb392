"""Frame sources for the edge agent: an OpenCV camera, a video file or a folder of images.

``open_source("camera:0")``, ``open_source("clip.avi")`` or ``open_source("frames/")`` returns an
iterator of ``CapturedFrame`` (RGB uint8, capture time in UNIX microseconds). Images in a folder
are taken in name order, so a run is reproducible.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("mridc.edge.capture")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".mjpg", ".mjpeg", ".webm", ".m4v"}


class CaptureError(RuntimeError):
    """The source cannot be opened or read."""


@dataclass(frozen=True)
class CapturedFrame:
    image: np.ndarray  # HxWx3 uint8, RGB
    capture_time_us: int
    index: int  # position in the source (0, 1, ...), restarts are not reset when looping
    name: str  # camera:0#12, file name, or video#frame


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - the edge extra installs it
        raise CaptureError("OpenCV is not installed: pip install 'mridc[edge]' (opencv-python-headless)") from exc
    return cv2


def _resize(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or (image.shape[1], image.shape[0]) == size:
        return image
    cv2 = _cv2()
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class FrameSource:
    """Iterable of frames, paced to ``fps`` (0 = unpaced), at most ``max_frames`` (None = no limit)."""

    def __init__(self, uri: str, *, fps: float = 0.0, size: tuple[int, int] | None = None, loop: bool = False,
                 max_frames: int | None = None) -> None:
        self.uri = uri
        self.fps = fps
        self.size = size
        self.loop = loop
        self.max_frames = max_frames
        self.kind, self._target = self._classify(uri)
        self._stop = threading.Event()

    def close(self) -> None:
        """Stop iterating (also interrupts the wait between paced frames)."""
        self._stop.set()

    @staticmethod
    def _classify(uri: str) -> tuple[str, object]:
        if uri.startswith("camera:"):
            index = uri.split(":", 1)[1]
            if not index.isdigit():
                raise CaptureError(f"camera source {uri!r}: expected camera:INDEX, e.g. camera:0")
            return "camera", int(index)
        path = Path(uri).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CaptureError(f"image folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            return "images", files
        if path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                return "images", [path]
            return "video", path
        raise CaptureError(f"source {uri!r} is neither camera:INDEX, an existing video file nor an image folder")

    def _raw_frames(self) -> Iterator[tuple[np.ndarray, str]]:
        cv2 = _cv2()
        if self.kind == "images":
            while True:
                for path in self._target:
                    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                    if bgr is None:
                        log.warning("skipping unreadable image %s", path)
                        continue
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), path.name
                if not self.loop:
                    return
        capture = cv2.VideoCapture(self._target if self.kind == "camera" else str(self._target))
        if not capture.isOpened():
            raise CaptureError(f"OpenCV cannot open {self.uri!r}" + (
                " (is the camera connected, and is the user in the 'video' group?)" if self.kind == "camera" else ""))
        try:
            position = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    if self.kind == "video" and self.loop and position > 0:
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        position = 0
                        continue
                    if self.kind == "camera":
                        raise CaptureError(f"camera {self._target} stopped delivering frames")
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), f"{self.uri}#{position}"
                position += 1
                if self.kind == "video" and self.fps > 0:
                    # Skip source frames so a 25 fps file feeds the agent at its own rate.
                    native = capture.get(cv2.CAP_PROP_FPS) or 0.0
                    skip = int(native / self.fps) - 1 if native > self.fps else 0
                    for _ in range(skip):
                        if not capture.grab():
                            break
                        position += 1
        finally:
            capture.release()

    def __iter__(self) -> Iterator[CapturedFrame]:
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        next_at = time.monotonic()
        for index, (image, name) in enumerate(self._raw_frames()):
            if self._stop.is_set() or self.max_frames is not None and index >= self.max_frames:
                return
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                next_at = max(next_at + period, time.monotonic() - period)
            yield CapturedFrame(_resize(image, self.size), time.time_ns() // 1000, index, name)


def open_source(uri: str, **options) -> FrameSource:
    """``camera:INDEX``, a video file, an image file or an image folder (see ``FrameSource``)."""
    return FrameSource(uri, **options)
