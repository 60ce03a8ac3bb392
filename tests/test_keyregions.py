"""Key regions: ROI rasterisation, Haar detection in numpy, the source registry (mridc.edge.keyregions)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mridc.edge import keyregions as kr
from mridc.edge.haar import group_rectangles

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ASTRONAUT = DATA / "photos" / "eval" / "astronaut.png"


def test_box_rasterises_to_the_tokens_it_covers():
    mask = kr.rasterize_rois([kr.Box(16, 16, 48, 32)], (4, 6), 16)
    expected = np.zeros((4, 6), bool)
    expected[1, 1:3] = True
    assert np.array_equal(mask, expected)
    cov = kr.roi_coverage([kr.Box(8, 0, 24, 16)], (2, 2), 16)
    np.testing.assert_allclose(cov, [[0.5, 0.5], [0.0, 0.0]], atol=0.02)


def test_polygon_rasterisation():
    # right triangle over a 4x4-token square: the diagonal tokens are half covered
    tri = kr.Polygon(((0, 0), (64, 0), (0, 64)))
    cov = kr.roi_coverage([tri], (4, 4), 16)
    assert cov[0, 0] == pytest.approx(1.0) and cov[3, 3] == 0.0
    assert all(0.4 < cov[i, 3 - i] < 0.65 for i in range(4))
    mask = kr.rasterize_rois([tri], (4, 4), 16, min_coverage=0.25)
    assert mask[0, 0] and mask[1, 2] and not mask[3, 3] and not mask[2, 3]


def test_small_roi_still_marks_a_token_and_outside_roi_marks_none():
    mask = kr.rasterize_rois([kr.Box(20, 20, 24, 24)], (4, 4), 16)
    assert mask.sum() == 1 and mask[1, 1]
    assert not kr.rasterize_rois([kr.Box(500, 500, 600, 600)], (4, 4), 16).any()


def test_parse_roi_forms_and_errors():
    assert kr.parse_roi([1, 2, 30, 40]) == kr.Box(1, 2, 30, 40)
    assert kr.parse_roi({"box": [1, 2, 30, 40]}) == kr.Box(1, 2, 30, 40)
    poly = kr.parse_roi({"polygon": [[0, 0], [10, 0], [5, 8]]})
    assert isinstance(poly, kr.Polygon) and len(poly.points) == 3
    assert isinstance(kr.parse_roi([[0, 0], [10, 0], [5, 8], [0, 8]]), kr.Polygon)
    for bad in ({"circle": [1, 2, 3]}, [[0, 0], [1, 1]], [5, 5, 1, 1], "doorway"):
        with pytest.raises(ValueError):
            kr.parse_roi(bad)


def test_group_rectangles_merges_neighbours_and_drops_loners():
    rects = [(100, 100, 40, 40), (102, 101, 40, 40), (99, 98, 42, 42), (300, 10, 40, 40)]
    groups = group_rectangles(rects, min_neighbors=2)
    assert len(groups) == 1 and abs(groups[0][0] - 100.3) < 1


def test_source_registry():
    assert {"faces", "bodies"} <= set(kr.key_sources())
    name = "test-left-column"

    def left_column(image, grid_shape, stride):
        out = np.zeros(grid_shape, np.float32)
        out[:, 0] = 1.0
        return out

    registry = kr.KeySourceRegistry()  # a registry of its own: the default one stays as shipped
    registry.register("faces", kr.get_key_source("faces"))
    registry.register(name, left_column)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(name, left_column)
    with pytest.raises(ValueError, match="unknown key source"):
        kr.get_key_source("no-such-source")
    assert name not in kr.key_sources() and registry.names() == sorted(["faces", name])
    img = np.full((64, 96, 3), 128, np.uint8)
    regions = kr.detect_key_regions(
        img, (4, 6), 16, rois=[{"box": [80, 48, 96, 64]}], use_faces=True, sources=[name], registry=registry
    )
    assert set(regions.per_source) == {"rois", "faces", name}
    assert not regions.per_source["faces"].any()  # a flat frame has no faces
    assert regions.mask[:, 0].all() and regions.mask[3, 5] and regions.mask.sum() == 5
    with pytest.raises(ValueError, match="unknown key source"):
        kr.detect_key_regions(img, (4, 6), 16, use_faces=False, sources=[name])


def test_rois_from_agent_config_and_scaled():
    assert kr.roi_from_config((10, 20, 30, 40)) == {"box": [10, 20, 40, 60]}
    assert kr.roi_from_config({"box": [1, 2, 3, 4]}) == {"box": [1, 2, 3, 4]}
    assert kr.scale_roi([10, 20, 40, 60], 0.5, 0.25) == {"box": [5.0, 5.0, 20.0, 15.0]}
    assert kr.scale_roi([[0, 0], [10, 0], [5, 8]], 2, 1) == {"polygon": [[0.0, 0.0], [20.0, 0.0], [10.0, 8.0]]}


def test_detect_key_mask_rejects_image_larger_than_grid():
    with pytest.raises(ValueError, match="larger than the token grid"):
        kr.detect_key_mask(np.zeros((100, 100, 3), np.uint8), (4, 4), 16, use_faces=False)


@pytest.mark.skipif(not ASTRONAUT.exists(), reason="shared data not present")
def test_face_found_on_astronaut():
    img = cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)  # 512x512
    faces = kr.detect_faces(img)
    assert len(faces) == 1
    face = faces[0]
    cx, cy = (face.x0 + face.x1) / 2, (face.y0 + face.y1) / 2
    assert 195 < cx < 255 and 85 < cy < 145 and 60 < face.x1 - face.x0 < 130
    mask = kr.detect_key_mask(img, (32, 32), 16, use_faces=True)
    assert mask[int(cy) // 16, int(cx) // 16]
    assert 16 <= mask.sum() <= 80 and not mask[20:, :].any()
