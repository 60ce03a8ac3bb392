"""Key regions: parts of a frame whose tokens the masking must not drop.

Sources give per-token coverage maps on the token grid; `detect_key_mask` thresholds their union.
- user ROIs from the device config: boxes ``[x0, y0, x1, y1]`` or polygons ``[[x, y], ...]``, pixel coords;
- registered detectors: ``faces`` (Haar frontal face), ``bodies`` (Haar full body), and whatever
  `register_key_source` adds (a motion map next).

The Haar cascades are OpenCV's XML files, carried in ``edge/assets/`` with their licence, and evaluated
here in numpy: opencv-python-headless 5 dropped ``cv2.CascadeClassifier``, and one implementation on every
device keeps detections (and so the bytes) the same across OpenCV builds.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.lib.stride_tricks import as_strided

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


# --------------------------------------------------------------------------- Haar cascade in numpy


@dataclass
class HaarCascade:
    """An OpenCV HAAR cascade (stump weak classifiers, upright and tilted features)."""

    window: tuple[int, int]  # (width, height)
    stage_thresholds: np.ndarray  # (S,)
    stage_slices: list[slice]  # weak-classifier range per stage
    feature_index: np.ndarray  # (K,) feature used by each weak classifier
    node_thresholds: np.ndarray  # (K,)
    leaves: np.ndarray  # (K, 2): value when feature < threshold, otherwise
    rects: np.ndarray  # (F, 3, 4) int: x, y, w, h per rect (unused rects are zero)
    weights: np.ndarray  # (F, 3)
    tilted: np.ndarray  # (F,) bool

    def __post_init__(self) -> None:
        if not np.array_equal(self.weights, np.round(self.weights)):
            raise ValueError("only cascades with integer rect weights are supported")
        self.int_weights = self.weights.astype(np.int32)

    @classmethod
    def load(cls, path: str | Path) -> HaarCascade:
        root = ET.parse(path).getroot()
        casc = root.find("cascade")
        if casc is None or (casc.findtext("featureType") or "").strip() != "HAAR":
            raise ValueError(f"{path}: not an OpenCV HAAR cascade in the new XML format")
        window = (int(casc.findtext("width")), int(casc.findtext("height")))
        thresholds, slices, feat_idx, node_thr, leaves = [], [], [], [], []
        for stage in casc.find("stages"):
            start = len(feat_idx)
            for weak in stage.find("weakClassifiers"):
                nodes = weak.findtext("internalNodes").split()
                if len(nodes) != 4:
                    raise ValueError(f"{path}: only stump cascades are supported")
                feat_idx.append(int(nodes[2]))
                node_thr.append(float(nodes[3]))
                leaves.append([float(v) for v in weak.findtext("leafValues").split()])
            thresholds.append(float(stage.findtext("stageThreshold")))
            slices.append(slice(start, len(feat_idx)))
        features = list(casc.find("features"))
        rects = np.zeros((len(features), 3, 4), np.int64)
        weights = np.zeros((len(features), 3))
        tilted = np.zeros(len(features), bool)
        for f, feat in enumerate(features):
            for r, rect in enumerate(feat.find("rects")):
                vals = rect.text.split()
                rects[f, r] = [int(v) for v in vals[:4]]
                weights[f, r] = float(vals[4])
            tilted[f] = (feat.findtext("tilted") or "0").strip() == "1"
        return cls(
            window,
            np.array(thresholds),
            slices,
            np.array(feat_idx),
            np.array(node_thr),
            np.array(leaves),
            rects,
            weights,
            tilted,
        )

    def _offsets(self, row: int, plane: int) -> np.ndarray:
        """(F, 3, 4) flat offsets of the p0..p3 corners of each rect; sum = p0 - p1 - p2 + p3."""
        x, y, w, h = (self.rects[..., i] for i in range(4))
        upright = np.stack([x + row * y, x + w + row * y, x + row * (y + h), x + w + row * (y + h)], -1)
        tilt = (
            np.stack(
                [
                    x + row * y,
                    x - h + row * (y + h),
                    x + w + row * (y + w),
                    x + w - h + row * (y + w + h),
                ],
                -1,
            )
            + plane
        )
        return np.where(self.tilted[:, None, None], tilt, upright)

    def _scan(self, gray: np.ndarray, step: int) -> np.ndarray:
        """Top-left corners (N, 2) as (x, y) of windows of one image scale the cascade accepts.

        Early stages, which see most windows, run densely on strided views of the integral images;
        once few windows survive, the rest run on gathered corners of the survivors only."""
        ww, wh = self.window
        sums, sqsums, tilts = cv2.integral3(gray, sdepth=cv2.CV_32S, sqdepth=cv2.CV_64F)
        row, plane = sums.shape[1], sums.size
        # int32 wraps, but every feature value fits in int32, so the wrapped sums are exact.
        table = np.concatenate([sums.ravel(), tilts.ravel()])
        ny, nx = len(range(0, gray.shape[0] - wh, step)), len(range(0, gray.shape[1] - ww, step))
        if ny <= 0 or nx <= 0:
            return np.zeros((0, 2), np.int64)
        item = table.itemsize

        def dense(offset: int, src: np.ndarray = table, size: int = item) -> np.ndarray:
            return as_strided(src[offset:], (ny, nx), (row * step * size, step * size), writeable=False)

        # Variance normalisation over the window less a 1-pixel border, as OpenCV does.
        n0, n1, n2, n3 = row + 1, row + ww - 1, (wh - 1) * row + 1, (wh - 1) * row + ww - 1
        area = (ww - 2) * (wh - 2)
        ssum = (dense(n0) - dense(n1) - dense(n2) + dense(n3)).astype(np.float64)
        sq = sqsums.ravel()
        ssq = dense(n0, sq, 8) - dense(n1, sq, 8) - dense(n2, sq, 8) + dense(n3, sq, 8)
        nf = area * ssq - ssum * ssum
        # OpenCV skips windows whose grey-level std is 10 or less: nothing to detect there.
        alive = nf > (10.0 * area) ** 2
        nf = np.sqrt(np.maximum(nf, 1.0))
        offsets = self._offsets(row, plane)
        stages = list(zip(self.stage_thresholds, self.stage_slices, strict=True))
        s = 0
        while s < len(stages) and alive.mean() > 0.2:
            stage_thr, sl = stages[s]
            total = np.zeros((ny, nx))
            for k in range(sl.start, sl.stop):
                f = self.feature_index[k]
                acc = np.zeros((ny, nx), table.dtype)
                for r in range(3):
                    if self.int_weights[f, r] != 0:
                        o = offsets[f, r]
                        acc += (dense(o[0]) - dense(o[1]) - dense(o[2]) + dense(o[3])) * self.int_weights[
                            f, r
                        ]
                total += np.where(acc < self.node_thresholds[k] * nf, self.leaves[k, 0], self.leaves[k, 1])
            alive &= total >= stage_thr
            s += 1
        ys, xs = np.nonzero(alive)
        base = ys * step * row + xs * step
        nf = nf[alive]
        for stage_thr, sl in stages[s:]:
            if base.size == 0:
                break
            feats = self.feature_index[sl]
            corners = table[base[:, None, None, None] + offsets[feats][None]]  # (N, K, 3, 4)
            rect_sums = corners[..., 0] - corners[..., 1] - corners[..., 2] + corners[..., 3]
            value = (rect_sums * self.int_weights[feats][None]).sum(-1)
            votes = np.where(
                value < self.node_thresholds[sl] * nf[:, None], self.leaves[sl, 0], self.leaves[sl, 1]
            )
            keep = votes.sum(-1) >= stage_thr
            base, nf = base[keep], nf[keep]
        return np.stack([base % row, base // row], -1)

    def detect(
        self,
        gray: np.ndarray,
        scale_factor: float = 1.1,
        min_neighbors: int = 3,
        min_size: tuple[int, int] = (0, 0),
        max_size: tuple[int, int] | None = None,
    ) -> list[Box]:
        """Detections on an 8-bit grey image, in its pixel coordinates (OpenCV's detectMultiScale)."""
        if gray.dtype != np.uint8 or gray.ndim != 2:
            raise ValueError("HaarCascade.detect wants a 2-D uint8 grey image")
        ww, wh = self.window
        h, w = gray.shape
        max_w, max_h = max_size or (w, h)
        found: list[tuple[float, float, float, float]] = []
        factor = 1.0
        while True:
            sw, sh = round(w / factor), round(h / factor)
            win_w, win_h = round(ww * factor), round(wh * factor)
            if sw - ww <= 0 or sh - wh <= 0 or win_w > max_w or win_h > max_h:
                break
            if win_w >= min_size[0] and win_h >= min_size[1]:
                scaled = gray if factor == 1.0 else cv2.resize(gray, (sw, sh), interpolation=cv2.INTER_LINEAR)
                for x, y in self._scan(scaled, 1 if factor > 2 else 2):
                    found.append((round(x * factor), round(y * factor), win_w, win_h))
            factor *= scale_factor
        return [Box(x, y, x + bw, y + bh) for x, y, bw, bh in group_rectangles(found, min_neighbors)]


def group_rectangles(
    rects: Sequence[tuple[float, float, float, float]], min_neighbors: int, eps: float = 0.2
) -> list[tuple[float, float, float, float]]:
    """Cluster similar (x, y, w, h) rects and average each cluster of more than `min_neighbors`
    (OpenCV's groupRectangles, without its nested-rectangle pass)."""
    n = len(rects)
    if n == 0:
        return []
    r = np.asarray(rects, np.float64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    x0, y0, x1, y1 = r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]
    for i in range(n):
        delta = eps * (np.minimum(r[i, 2], r[:, 2]) + np.minimum(r[i, 3], r[:, 3])) * 0.5
        near = (
            (np.abs(x0[i] - x0) <= delta)
            & (np.abs(y0[i] - y0) <= delta)
            & (np.abs(x1[i] - x1) <= delta)
            & (np.abs(y1[i] - y1) <= delta)
        )
        for j in np.flatnonzero(near[i + 1 :]) + i + 1:
            parent[find(int(j))] = find(i)
    labels = np.array([find(i) for i in range(n)])
    out = []
    for lab in np.unique(labels):
        members = r[labels == lab]
        if len(members) > min_neighbors:
            out.append(tuple(float(v) for v in members.mean(0)))
    return out


@functools.cache
def load_cascade(path: str) -> HaarCascade:
    return HaarCascade.load(path)


# --------------------------------------------------------------------------- detector sources

KeySource = Callable[[np.ndarray, GridShape, int], np.ndarray]
"""(image_rgb_uint8, grid_shape, stride) -> float32 (gh, gw) key score in [0, 1] (>= 0.5 means key)."""

_SOURCES: dict[str, KeySource] = {}


def register_key_source(name: str, source: KeySource | None = None):
    """Register a key-region source under `name`; usable as a decorator."""

    def add(fn: KeySource) -> KeySource:
        if name in _SOURCES:
            raise ValueError(f"key source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return add(source) if source is not None else add


def key_sources() -> list[str]:
    return sorted(_SOURCES)


def get_key_source(name: str) -> KeySource:
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown key source {name!r}; registered: {key_sources()}") from None


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
    return [Box(b.x0 * scale, b.y0 * scale, b.x1 * scale, b.y1 * scale) for b in boxes]


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
) -> KeyRegions:
    """Key tokens from user ROIs, faces (if `use_faces`) and the named registered `sources`.

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
        per_source[name] = get_key_source(name)(image_rgb, grid_shape, stride) >= 0.5
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
    "Box",
    "HaarCascade",
    "KeyRegions",
    "Polygon",
    "Roi",
    "detect_bodies",
    "detect_boxes",
    "detect_faces",
    "detect_key_mask",
    "detect_key_regions",
    "get_key_source",
    "group_rectangles",
    "key_sources",
    "parse_roi",
    "rasterize_rois",
    "register_key_source",
    "roi_coverage",
]
