"""OpenCV's HAAR cascades (stump weak classifiers, upright and tilted features) evaluated in numpy.

opencv-python-headless 5 dropped ``cv2.CascadeClassifier``, and one implementation on every device keeps
detections (and so the bytes) the same across OpenCV builds. The XML files are OpenCV's, carried in
``edge/assets/`` with their licence; `mridc.edge.keyregions` turns detections into key regions.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.lib.stride_tricks import as_strided

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


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
    ) -> list[Rect]:
        """Detections (x0, y0, x1, y1) on an 8-bit grey image, in its pixel coordinates (OpenCV's
        detectMultiScale)."""
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
        return [(x, y, x + bw, y + bh) for x, y, bw, bh in group_rectangles(found, min_neighbors)]


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


__all__ = ["HaarCascade", "Rect", "group_rectangles", "load_cascade"]
