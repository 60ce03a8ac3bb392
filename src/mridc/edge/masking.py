"""The MLM parts the encoder composes: the priority map (with key regions) and the selection policy.

The algorithms are in `mridc.edge.mlm` and `mridc.edge.keyregions`; these classes bind them to a
`MaskingConfig`, so `EdgeEncoder` (and the benchmarks) hold a part rather than re-wiring functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mridc.edge import mlm
from mridc.edge.keyregions import KEY_SOURCES, KeyRegions, KeySourceRegistry, Roi, detect_key_regions

GridShape = tuple[int, int]


@dataclass(frozen=True)
class KeyRegionConfig:
    """Which detectors mark key regions (user ROIs always do)."""

    use_faces: bool = False  # the Haar frontal-face detector
    sources: tuple[str, ...] = ()  # more registered key sources by name ("bodies", ...)


class MapPriority:
    """Per-token priority: key regions (ROIs and detectors), then `mlm.priority_map` with the config's weights."""

    def __init__(self, config: mlm.MaskingConfig | None = None, key_regions: KeyRegionConfig | None = None,
                 detectors: KeySourceRegistry = KEY_SOURCES):
        self.config = config or mlm.MaskingConfig()
        self.key_config = key_regions or KeyRegionConfig()
        self.detectors = detectors

    def key_regions(self, image_rgb: np.ndarray, grid: GridShape, stride: int,
                    rois: Sequence[Roi | Mapping | Sequence] = ()) -> KeyRegions:
        """Key tokens of a frame (as captured, or as the runner sees it; ROIs in its pixel coordinates)."""
        return detect_key_regions(image_rgb, grid, stride, rois=rois, use_faces=self.key_config.use_faces,
                                  sources=self.key_config.sources, registry=self.detectors)

    def score(self, image_rgb: np.ndarray, grid: GridShape, stride: int, *, quant_error: np.ndarray | None = None,
              tokens: np.ndarray | None = None, key_mask: np.ndarray | None = None,
              extra_maps: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """float32 (gh, gw), higher = keep first."""
        return mlm.priority_map(image_rgb, grid, stride, quant_error=quant_error, tokens=tokens, key_mask=key_mask,
                                extra_maps=extra_maps, config=self.config)


class SelectionPolicy(Protocol):
    """The order in which tokens are kept; keeping n tokens keeps the first n of it."""

    def order(self, priority: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
        """Raster indices of all tokens, best first."""
        ...

    def warning(self, n_keep: int, key_mask: np.ndarray | None) -> str | None:
        """What to tell the user when keeping `n_keep` tokens drops something it promised to keep."""
        ...

    def select(self, priority: np.ndarray, n_keep: int, key_mask: np.ndarray | None) -> mlm.KeepSelection:
        """The keep mask of the first `n_keep` tokens (the keep-ratio mode), with its warning."""
        ...


class MapGuidedSelection:
    """Map-guided latent masking: key-region tokens, then one anchor per block, then by priority (`mlm`)."""

    def __init__(self, config: mlm.MaskingConfig | None = None):
        self.config = config or mlm.MaskingConfig()

    def order(self, priority: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
        return mlm.selection_order(priority, key_mask, self.config)

    def warning(self, n_keep: int, key_mask: np.ndarray | None) -> str | None:
        return mlm.key_region_warning(n_keep, key_mask, self.config)

    def select(self, priority: np.ndarray, n_keep: int, key_mask: np.ndarray | None) -> mlm.KeepSelection:
        return mlm.select_keep_mask(priority, n_keep, key_mask, self.config)


__all__ = ["KeyRegionConfig", "MapGuidedSelection", "MapPriority", "SelectionPolicy"]
