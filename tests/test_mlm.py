"""Map-guided latent masking: priority map, selection and exact rate control (mridc.edge.mlm)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from mridc.edge import mlm
from mridc.edge.mlm import MaskingConfig

STRIDE = 16


def _photo_like(h: int = 512, w: int = 768, seed: int = 0) -> np.ndarray:
    """Smooth background, one textured quadrant and a few edges: enough structure for the map."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1), np.full_like(xs, 128)], -1)
    img[: h // 2, : w // 2] = rng.integers(0, 256, (h // 2, w // 2, 3))
    img[h // 2 :, w // 2 : w // 2 + 4] = 255
    return img.astype(np.uint8)


def _tokens(grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, grid).astype(np.uint16)


def fake_pack(tokens: np.ndarray):
    """Deterministic stand-in for bitstream.compress: header + deflated mask + 10 bits per token."""

    def pack(keep: np.ndarray) -> bytes:
        mask_bytes = zlib.compress(np.packbits(keep.ravel()).tobytes(), 9)
        kept = tokens[keep].astype("<u2").tobytes()
        return b"MRD-HEADER-20-BYTES!" + mask_bytes + kept[: (int(keep.sum()) * 10 + 7) // 8]

    return pack


def _order_mask(priority, key_mask, n, config=None):
    order = mlm.selection_order(priority, key_mask, config or MaskingConfig())
    return mlm.mask_from_order(order, n, priority.shape)


# --------------------------------------------------------------------------- priority map


def test_priority_map_shape_dtype_and_texture_ranks_first():
    img = _photo_like()
    grid = mlm.grid_shape_for(512, 768, STRIDE)
    assert grid == (32, 48)
    p = mlm.priority_map(img, grid, STRIDE, config=MaskingConfig(neighbour_weight=0, quant_error_weight=0))
    assert p.shape == grid and p.dtype == np.float32
    assert p[:16, :24].mean() > 2 * p[16:, :24].mean()  # noise quadrant beats the smooth gradient


def test_priority_map_padded_and_unpadded_agree():
    img = _photo_like(500, 760)
    grid = mlm.grid_shape_for(500, 760, STRIDE)
    padded = mlm.pad_to_grid(img, grid, STRIDE)
    assert padded.shape[:2] == (512, 768)
    np.testing.assert_array_equal(padded[499, 759], padded[511, 767])  # edge replication
    np.testing.assert_array_equal(mlm.priority_map(img, grid, STRIDE), mlm.priority_map(padded, grid, STRIDE))


def test_pad_to_grid_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="does not match grid"):
        mlm.pad_to_grid(np.zeros((512, 768, 3), np.uint8), (30, 48), STRIDE)


def test_priority_map_sources_and_shape_errors():
    img = _photo_like()
    grid = (32, 48)
    tokens = np.zeros(grid, np.uint16)
    tokens[10, 10] = 7  # differs from all its neighbours, and they from it
    nb = mlm.neighbour_difference(tokens)
    assert nb[10, 10] == 1.0 and nb[10, 11] == pytest.approx(1 / 8) and nb[0, 0] == 0.0
    q = np.zeros(grid)
    q[5, 5] = 3.0
    cfg = MaskingConfig(texture_weight=0, neighbour_weight=0, quant_error_weight=1.0)
    p = mlm.priority_map(img, grid, STRIDE, quant_error=q, config=cfg)
    assert p.argmax() == 5 * 48 + 5
    motion = np.zeros(grid)
    motion[20, 30] = 1.0
    p = mlm.priority_map(
        img, grid, STRIDE, extra_maps={"motion": motion}, config=MaskingConfig(texture_weight=0)
    )
    assert p.argmax() == 20 * 48 + 30
    with pytest.raises(ValueError, match="quant_error has shape"):
        mlm.priority_map(img, grid, STRIDE, quant_error=np.zeros((3, 3)))


def test_config_from_dict_round_trip_and_unknown_key():
    cfg = MaskingConfig(anchor_spacing=0, extra_weights={"motion": 2.0})
    assert MaskingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown masking config keys"):
        MaskingConfig.from_dict({"texture_wieght": 1.0})


# --------------------------------------------------------------------------- selection


def test_select_keeps_exact_count_and_highest_priority():
    rng = np.random.default_rng(1)
    p = rng.random((32, 48)).astype(np.float32)
    keep, warning = mlm.select_keep_mask(p, 300, None, MaskingConfig(anchor_spacing=0))
    assert keep.sum() == 300 and warning is None
    assert p[keep].min() >= p[~keep].max()


def test_key_regions_are_kept_first_and_warned_when_they_do_not_fit():
    p = np.random.default_rng(2).random((32, 48)).astype(np.float32)
    key = np.zeros((32, 48), bool)
    key[20:26, 30:40] = True  # 60 tokens
    p[key] = 0.0  # lowest priority: only the key rule keeps them
    keep, warning = mlm.select_keep_mask(p, 100, key)
    assert keep[key].all() and keep.sum() == 100 and warning is None
    keep, warning = mlm.select_keep_mask(p, 40, key)
    assert keep.sum() == 40 and keep[key].sum() == 40 and not keep[~key].any()
    assert warning is not None and "20 key tokens" in warning


def test_anchors_leave_no_block_empty():
    p = np.zeros((32, 48), np.float32)
    p[:8, :8] = 1.0  # all the priority in one corner
    n_blocks = (32 // 4) * (48 // 4)
    keep, _ = mlm.select_keep_mask(p, n_blocks + 10, None, MaskingConfig(anchor_spacing=4))
    blocks = keep.reshape(8, 4, 12, 4).any(axis=(1, 3))
    assert blocks.all()
    keep, _ = mlm.select_keep_mask(p, n_blocks + 10, None, MaskingConfig(anchor_spacing=0))
    assert not keep.reshape(8, 4, 12, 4).any(axis=(1, 3)).all()


def test_ties_spread_over_the_grid():
    keep, _ = mlm.select_keep_mask(np.zeros((32, 48), np.float32), 384, None, MaskingConfig(anchor_spacing=0))
    # a quarter of a flat grid: every 2x2 cell gets exactly one token (ordered dither), not the top rows
    assert (keep.reshape(16, 2, 24, 2).sum(axis=(1, 3)) == 1).all()


def test_keep_ratio_and_target_bytes_helpers():
    assert mlm.keep_count_for_ratio(0.5, 1536) == 768
    with pytest.raises(ValueError):
        mlm.keep_count_for_ratio(1.5, 10)
    assert mlm.target_bytes_for_bpp(0.02, 768, 512) == 983
    assert mlm.target_bytes_for_bpp(0.03, 768, 512) == 1474


# --------------------------------------------------------------------------- rate control


@pytest.mark.parametrize("target", [60, 200, 500, 983, 1400, 1800])
def test_fit_to_budget_is_largest_that_fits(target):
    img = _photo_like()
    tokens = _tokens((32, 48))
    pack = fake_pack(tokens)
    p = mlm.priority_map(img, (32, 48), STRIDE, tokens=tokens)
    keep, stream, info = mlm.fit_to_budget(tokens, p, None, target, pack)
    assert len(stream) <= target and stream == pack(keep)
    assert info.n_keep == keep.sum() and info.stream_bytes == len(stream)
    if info.n_keep < keep.size:
        assert len(pack(_order_mask(p, None, info.n_keep + 1))) > target
    assert info.pack_calls <= 12


def test_fit_to_budget_all_tokens_fit():
    tokens = _tokens((8, 8))
    p = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    keep, _, info = mlm.fit_to_budget(tokens, p, None, 10_000, fake_pack(tokens))
    assert keep.all() and info.n_keep == 64 and info.next_bytes is None


def test_fit_to_budget_below_minimal_stream_raises():
    tokens = _tokens((32, 48))
    p = np.zeros((32, 48), np.float32)
    with pytest.raises(ValueError, match="below the smallest possible stream"):
        mlm.fit_to_budget(tokens, p, None, 10, fake_pack(tokens))


def test_fit_to_budget_protects_key_regions_and_warns():
    img = _photo_like()
    tokens = _tokens((32, 48))
    key = np.zeros((32, 48), bool)
    key[24:30, 2:12] = True  # in the smooth part: low texture priority
    p = mlm.priority_map(img, (32, 48), STRIDE, key_mask=key, config=MaskingConfig(key_weight=0))
    keep, _, info = mlm.fit_to_budget(tokens, p, key, 400, fake_pack(tokens))
    assert keep[key].all() and info.warning is None and info.n_key == 60
    keep, _, info = mlm.fit_to_budget(tokens, p, key, 70, fake_pack(tokens))
    assert 0 < keep.sum() < 60 and not keep[~key].any() and "key tokens" in info.warning


def test_policy_and_order_search_are_fit_to_budget_in_parts():
    from mridc.edge.masking import MapGuidedSelection

    img = _photo_like()
    tokens = _tokens((32, 48))
    key = np.zeros((32, 48), bool)
    key[24:30, 2:12] = True
    p = mlm.priority_map(img, (32, 48), STRIDE, key_mask=key)
    policy = MapGuidedSelection(MaskingConfig())
    for target in (70, 400, 983):
        keep, stream, info = mlm.fit_to_budget(tokens, p, key, target, fake_pack(tokens))
        keep2, stream2, info2 = mlm.fit_order_to_budget(policy.order(p, key), p.shape, target, fake_pack(tokens))
        assert np.array_equal(keep, keep2) and stream == stream2 and info.n_keep == info2.n_keep
        assert info.warning == policy.warning(info2.n_keep, key)
    selected = policy.select(p, 100, key)
    assert np.array_equal(selected.keep_mask, mlm.select_keep_mask(p, 100, key).keep_mask)


def test_fit_to_budget_deterministic_and_start_hint_agrees():
    img = _photo_like()
    tokens = _tokens((32, 48))
    pack = fake_pack(tokens)
    p = mlm.priority_map(img, (32, 48), STRIDE, tokens=tokens)
    a = mlm.fit_to_budget(tokens, p, None, 983, pack)
    b = mlm.fit_to_budget(tokens, mlm.priority_map(img, (32, 48), STRIDE, tokens=tokens), None, 983, pack)
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
    c = mlm.fit_to_budget(tokens, p, None, 983, pack, start_keep=a[2].n_keep)
    assert c[1] == a[1] and c[2].pack_calls <= 2


def test_degenerate_flat_tiny_and_all_key():
    flat = np.full((512, 768, 3), 90, np.uint8)
    p = mlm.priority_map(flat, (32, 48), STRIDE, tokens=np.zeros((32, 48), np.uint16))
    assert not p.any()
    tokens = _tokens((32, 48))
    keep, stream, _ = mlm.fit_to_budget(tokens, p, None, 500, fake_pack(tokens))
    assert len(stream) <= 500 and keep.any()

    tiny = np.full((5, 9, 3), 200, np.uint8)  # one token
    grid = mlm.grid_shape_for(5, 9, STRIDE)
    assert grid == (1, 1)
    p = mlm.priority_map(tiny, grid, STRIDE, tokens=np.zeros(grid, np.uint16))
    one = np.array([[3]], np.uint16)
    keep, stream, info = mlm.fit_to_budget(one, p, None, 100, fake_pack(one))
    assert keep.all() and info.n_keep == 1
    keep, stream, info = mlm.fit_to_budget(
        one, p, None, len(fake_pack(one)(np.zeros((1, 1), bool))), fake_pack(one)
    )
    assert not keep.any()

    key = np.ones((32, 48), bool)
    p = mlm.priority_map(_photo_like(), (32, 48), STRIDE, key_mask=key)
    keep, _, info = mlm.fit_to_budget(tokens, p, key, 983, fake_pack(tokens))
    assert 0 < info.n_keep < keep.size and info.warning is not None


def test_fit_to_budget_with_real_bitstream():
    from mridc.shared import bitstream, entropy

    img = _photo_like()
    grid = (32, 48)
    tokens = (np.arange(32 * 48).reshape(grid) // 7 % 1024).astype(np.uint16)
    prior = entropy.TokenPrior.uniform(1024)

    def pack(keep: np.ndarray) -> bytes:
        frame = bitstream.TokenFrame(
            width=768,
            height=512,
            grid_h=32,
            grid_w=48,
            model_id=0x1234ABCD,
            codebook_bits=10,
            keep_mask=keep,
            kept_tokens=tokens[keep],
        )
        return bitstream.compress(frame, prior, token_coder="static")

    p = mlm.priority_map(img, grid, STRIDE, tokens=tokens)
    target = mlm.target_bytes_for_bpp(0.02, 768, 512)
    token_bits = np.full(grid, 10.0)
    keep, stream, info = mlm.fit_to_budget(tokens, p, None, target, pack, token_bits=token_bits)
    assert len(stream) <= target < len(pack(_order_mask(p, None, info.n_keep + 1)))
    frame = bitstream.decompress(stream, prior)
    assert np.array_equal(frame.keep_mask, keep) and np.array_equal(frame.kept_tokens, tokens[keep])
    with pytest.raises(ValueError, match="below the smallest"):
        mlm.fit_to_budget(tokens, p, None, 8, pack)
