"""Key regions: parts of a frame whose tokens the masking must not drop.

Sources give per-token coverage maps on the token grid; `detect_key_mask` thresholds their union.
- user ROIs from the device config: boxes ``[x0, y0, x1, y1]`` or polygons ``[[x, y], ...]``, pixel coords;
- detectors from a `KeySourceRegistry`: the default one, `KEY_SOURCES`, has ``faces`` (Haar frontal
  face) and ``bodies`` (Haar full body); `register_key_source` adds to it (a motion map next).

The Haar cascades are evaluated in numpy by `mridc.edge.haar`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mridc.edge.haar import load_cascade

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
FACE_CASCADE = ASSETS_DIR / "haarcascade_frontalface_default.xml"
BODY_CASCADE = ASSETS_DIR / "haarcascade_fullbody.xml"

GridShape = tuple[int, int]


# --------------------------------------------------------------------------- regions of interest


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel coordinates; x1, y1 exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"empty box {self}: need x1 > x0 and y1 > y0")

    def expanded(self, margin: float) -> Box:
        """Grown by `margin` times its size on every side."""
        dx, dy = margin * (self.x1 - self.x0), margin * (self.y1 - self.y0)
        return Box(self.x0 - dx, self.y0 - dy, self.x1 + dx, self.y1 + dy)

    def polygon(self) -> np.ndarray:
        return np.array([[self.x0, self.y0], [self.x1, self.y0], [self.x1, self.y1], [self.x0, self.y1]])


@dataclass(frozen=True)
class Polygon:
    """Closed polygon in pixel coordinates (vertex order either way)."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.points) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(self.points)}")

    def polygon(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64)


Roi = Box | Polygon


def parse_roi(spec: Roi | Mapping | Sequence) -> Roi:
    """A ROI from config: ``{"box": [x0, y0, x1, y1]}``, ``{"polygon": [[x, y], ...]}``,
    a bare ``[x0, y0, x1, y1]`` or a bare list of points."""
    if isinstance(spec, Box | Polygon):
        return spec
    if isinstance(spec, Mapping):
        if set(spec) == {"box"}:
            return parse_roi(list(spec["box"]))
        if set(spec) == {"polygon"}:
            return Polygon(tuple((float(x), float(y)) for x, y in spec["polygon"]))
        raise ValueError(f"ROI mapping needs exactly one key 'box' or 'polygon', got {sorted(spec)}")
    items = list(spec)
    if len(items) == 4 and all(isinstance(v, int | float) for v in items):
        return Box(*(float(v) for v in items))
    try:
        return Polygon(tuple((float(x), float(y)) for x, y in items))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"cannot read ROI {spec!r}: expected a box [x0, y0, x1, y1] or [[x, y], ...]"
        ) from exc


def roi_from_config(roi):
    """Agent configs give (x, y, w, h) tuples; everything else here takes boxes as x0, y0, x1, y1 or dicts."""
    if isinstance(roi, (tuple, list)) and len(roi) == 4 and all(isinstance(v, (int, float)) for v in roi):
        x, y, w, h = roi
        return {"box": [x, y, x + w, y + h]}
    return roi


def scale_roi(roi, fx: float, fy: float):
    """A ROI in a frame's pixels -> the same region in the frame resized by (fx, fy)."""
    parsed = parse_roi(roi)
    if isinstance(parsed, Box):
        return {"box": [parsed.x0 * fx, parsed.y0 * fy, parsed.x1 * fx, parsed.y1 * fy]}
    if isinstance(parsed, Polygon):
        return {"polygon": [[x * fx, y * fy] for x, y in parsed.points]}
    return roi


def _box_coverage(box: Box, grid_shape: GridShape, stride: int) -> np.ndarray:
    """Exact overlap area of `box` with each token cell, as a fraction of the cell."""
    gh, gw = grid_shape
    edges_y, edges_x = np.arange(gh + 1) * stride, np.arange(gw + 1) * stride
    oy = np.clip(np.minimum(box.y1, edges_y[1:]) - np.maximum(box.y0, edges_y[:-1]), 0, None)
    ox = np.clip(np.minimum(box.x1, edges_x[1:]) - np.maximum(box.x0, edges_x[:-1]), 0, None)
    return (np.outer(oy, ox) / float(stride * stride)).astype(np.float32)


def roi_coverage(rois: Iterable[Roi], grid_shape: GridShape, stride: int) -> np.ndarray:
    """Fraction of each token's stride x stride cell covered by the union of `rois`, float32 (gh, gw).

    Boxes are exact; polygons are filled on the pixel grid (to within half a pixel at their edges)."""
    gh, gw = grid_shape
    rois = list(rois)
    boxes = [r for r in rois if isinstance(r, Box)]
    polygons = [r for r in rois if not isinstance(r, Box)]
    if len(boxes) == 1 and not polygons:
        return _box_coverage(boxes[0], grid_shape, stride)
    canvas = np.zeros((gh * stride, gw * stride), np.uint8)
    for box in boxes:  # a union needs pixels: boxes may overlap each other or a polygon
        x0, y0 = max(0, round(box.x0)), max(0, round(box.y0))
        canvas[y0 : max(y0, round(box.y1)), x0 : max(x0, round(box.x1))] = 1
    for poly in polygons:
        # fillPoly puts pixel centres on integer coordinates; ROI coordinates put them at +0.5.
        pts = np.round(poly.polygon() - 0.5).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8)
    return canvas.reshape(gh, stride, gw, stride).mean(axis=(1, 3), dtype=np.float32)


def rasterize_rois(
    rois: Iterable[Roi], grid_shape: GridShape, stride: int, min_coverage: float = 0.25
) -> np.ndarray:
    """Bool (gh, gw): tokens a ROI covers by at least `min_coverage` of their cell.

    A ROI smaller than that everywhere still marks the token it covers most, so no ROI vanishes."""
    mask = np.zeros(grid_shape, bool)
    for roi in rois:
        cov = roi_coverage([roi], grid_shape, stride)
        if cov.max() <= 0:
            continue  # wholly outside the frame
        hit = cov >= min_coverage
        if not hit.any():
            hit = cov == cov.max()
        mask |= hit
    return mask


# --------------------------------------------------------------------------- detector sources

KeySource = Callable[[np.ndarray, GridShape, int], np.ndarray]
"""(image_rgb_uint8, grid_shape, stride) -> float32 (gh, gw) key score in [0, 1] (>= 0.5 means key)."""



class KeySourceRegistry:
    """Key-region sources by name (detectors the encoder runs when a config names them)."""

    def __init__(self) -> None:
        self._sources: dict[str, KeySource] = {}

    def register(self, name: str, source: KeySource | None = None):
        """Register `source` under `name`; usable as a decorator."""

        def add(fn: KeySource) -> KeySource:
            if name in self._sources:
                raise ValueError(f"key source {name!r} is already registered")
            self._sources[name] = fn
            return fn

        return add(source) if source is not None else add

    def names(self) -> list[str]:
        return sorted(self._sources)

    def get(self, name: str) -> KeySource:
        try:
            return self._sources[name]
        except KeyError:
            raise ValueError(f"unknown key source {name!r}; registered: {self.names()}") from None


KEY_SOURCES = KeySourceRegistry()
"""The default registry: ``faces`` and ``bodies`` (below), plus whatever `register_key_source` adds."""


def register_key_source(name: str, source: KeySource | None = None):
    """Register a key-region source in `KEY_SOURCES`; usable as a decorator."""
    return KEY_SOURCES.register(name, source)


def key_sources() -> list[str]:
    return KEY_SOURCES.names()


def get_key_source(name: str) -> KeySource:
    return KEY_SOURCES.get(name)


def _grey(image_rgb: np.ndarray) -> np.ndarray:
    if image_rgb.ndim == 2:
        return np.ascontiguousarray(image_rgb, dtype=np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(image_rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def detect_boxes(
    image_rgb: np.ndarray,
    cascade_path: Path,
    *,
    max_side: int = 400,
    scale_factor: float = 1.2,
    min_neighbors: int = 3,
    min_size: int = 24,
) -> list[Box]:
    """Run a cascade on an image downscaled so its longer side is at most `max_side` (cost bound);
    boxes come back in the input's pixel coordinates."""
    grey = _grey(image_rgb)
    h, w = grey.shape
    scale = max(1.0, max(h, w) / max_side)
    if scale > 1.0:
        grey = cv2.resize(grey, (round(w / scale), round(h / scale)), interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    cascade = load_cascade(str(cascade_path))
    boxes = cascade.detect(grey, scale_factor, min_neighbors=min_neighbors, min_size=(min_size, min_size))
    return [Box(x0 * scale, y0 * scale, x1 * scale, y1 * scale) for x0, y0, x1, y1 in boxes]


def detect_faces(image_rgb: np.ndarray) -> list[Box]:
    return detect_boxes(image_rgb, FACE_CASCADE, min_neighbors=3)


def detect_bodies(image_rgb: np.ndarray) -> list[Box]:
    return detect_boxes(image_rgb, BODY_CASCADE, min_neighbors=2, min_size=28)


FACE_MARGIN = 0.2  # a Haar face box is eyes-to-mouth; grow it to take in forehead, chin and hair


@register_key_source("faces")
def _faces_source(image_rgb: np.ndarray, grid_shape: GridShape, stride: int) -> np.ndarray:
    boxes = [b.expanded(FACE_MARGIN) for b in detect_faces(image_rgb)]
    return rasterize_rois(boxes, grid_shape, stride).astype(np.float32)


@register_key_source("bodies")
def _bodies_source(image_rgb: np.ndarray, grid_shape: GridShape, stride: int) -> np.ndarray:
    return rasterize_rois(detect_bodies(image_rgb), grid_shape, stride).astype(np.float32)


# --------------------------------------------------------------------------- the encoder's entry point


@dataclass
class KeyRegions:
    mask: np.ndarray  # bool (gh, gw)
    per_source: dict[str, np.ndarray] = field(default_factory=dict)  # bool (gh, gw) per source


def detect_key_regions(
    image_rgb: np.ndarray,
    grid_shape: GridShape,
    stride: int,
    rois: Iterable[Roi | Mapping | Sequence] = (),
    use_faces: bool = True,
    sources: Sequence[str] = (),
    registry: KeySourceRegistry = KEY_SOURCES,
) -> KeyRegions:
    """Key tokens from user ROIs, faces (if `use_faces`) and the named `sources` of `registry`.

    `image_rgb` is the frame as captured or padded to the grid (ROIs and detections are in its pixel
    coordinates, which the encoder's bottom/right padding leaves unchanged)."""
    if image_rgb.shape[0] > grid_shape[0] * stride or image_rgb.shape[1] > grid_shape[1] * stride:
        raise ValueError(f"image {image_rgb.shape[:2]} is larger than the token grid {grid_shape} x {stride}")
    per_source: dict[str, np.ndarray] = {}
    roi_list = [parse_roi(r) for r in rois]
    if roi_list:
        per_source["rois"] = rasterize_rois(roi_list, grid_shape, stride)
    names = (["faces"] if use_faces else []) + [s for s in sources if s != "faces" or not use_faces]
    for name in names:
        per_source[name] = registry.get(name)(image_rgb, grid_shape, stride) >= 0.5
    mask = np.zeros(grid_shape, bool)
    for m in per_source.values():
        mask |= m
    return KeyRegions(mask, per_source)


def detect_key_mask(
    image_rgb: np.ndarray,
    grid_shape: GridShape,
    stride: int,
    rois: Iterable[Roi | Mapping | Sequence] = (),
    use_faces: bool = True,
    sources: Sequence[str] = (),
) -> np.ndarray:
    """Bool (gh, gw): tokens inside a key region (see `detect_key_regions`)."""
    return detect_key_regions(image_rgb, grid_shape, stride, rois, use_faces, sources).mask


__all__ = [
    "KEY_SOURCES",
    "Box",
    "KeyRegions",
    "KeySourceRegistry",
    "Polygon",
    "Roi",
    "detect_bodies",
    "detect_boxes",
    "detect_faces",
    "detect_key_mask",
    "detect_key_regions",
    "get_key_source",
    "key_sources",
    "parse_roi",
    "rasterize_rois",
    "register_key_source",
    "roi_coverage",
    "roi_from_config",
    "scale_roi",
]
