"""Finer grids than full resolution (FLAG_RESAMPLED) and the all-kept retry of the rate search."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from mridc.shared import protocol
from mridc.shared.bitstream import FLAG_RESAMPLED, BitstreamError, TokenFrame, compress, decompress, inspect
from mridc.shared.entropy import TokenPrior

PRIOR = TokenPrior.uniform(1024)


def frame(resampled: bool, grid=(5, 7)) -> TokenFrame:
    keep = np.ones(grid, bool)
    keep[0, 0] = False
    return TokenFrame(width=64, height=48, grid_h=grid[0], grid_w=grid[1], model_id=7, codebook_bits=10,
                      keep_mask=keep, kept_tokens=np.arange(keep.sum(), dtype=np.uint16), resampled=resampled)


def test_the_flag_round_trips_and_is_reported():
    stream = compress(frame(True), PRIOR)
    assert stream[3] & FLAG_RESAMPLED and inspect(stream)["resampled"] is True
    assert decompress(stream, PRIOR) == frame(True)
    plain = compress(frame(False), PRIOR)
    assert not plain[3] & FLAG_RESAMPLED and decompress(plain, PRIOR).resampled is False


def test_an_unknown_flag_is_still_refused():
    stream = bytearray(compress(frame(False), PRIOR))
    stream[3] |= 0x40
    stream[-4:] = zlib.crc32(bytes(stream[:-4])).to_bytes(4, "big")  # past the CRC, to the flag check
    with pytest.raises(BitstreamError, match="flag"):
        decompress(bytes(stream), PRIOR)


def test_geometry_of_a_finer_grid():
    assert protocol.grid_shape(512, 384, 16, 1.5) == (36, 48)
    assert protocol.is_scaled(512, 384, 36, 48, 16, resampled=True)
    assert not protocol.is_scaled(512, 384, 36, 48, 16)  # the implicit v1 rule: a larger grid is cropped
    with pytest.raises(ValueError):
        protocol.grid_shape(512, 384, 16, protocol.MAX_RESAMPLE_SCALE + 0.1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    up = protocol.resize_for_grid(image, (9, 10), 16)
    assert up.shape == (144, 160, 3)
    assert protocol.resize_to_frame(up, 120, 100).shape == (100, 120, 3)


@pytest.fixture(scope="module")
def encoder():
    from mridc.edge.encoder import EdgeEncoder

    return EdgeEncoder.from_bundle()


def smooth_frame() -> np.ndarray:
    yy, xx = np.mgrid[0:192, 0:256]
    return np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.uint8)


def test_encoder_marks_a_finer_grid_and_the_decoder_returns_the_frame_size(encoder):
    from mridc.cloud.pipeline import MRIDCDecoder

    result = encoder.encode(smooth_frame(), bpp=0.2, scale=1.5)
    tf = result.token_frame
    assert (tf.grid_h, tf.grid_w) == (18, 24) and tf.resampled
    assert decompress(result.bitstream, encoder.rate.prior).resampled
    image = MRIDCDecoder.from_models(with_diffusion=False).decode(result.bitstream, realism=0.0)
    assert image.shape == (192, 256, 3)
    # scale 1 and scaled-down streams keep the implicit v1 rule: no flag
    assert not encoder.encode(smooth_frame(), bpp=0.2, scale=1).token_frame.resampled
    assert not encoder.encode(smooth_frame(), bpp=0.01, scale=0.5).token_frame.resampled


def test_rate_search_keeps_every_token_when_that_fits(encoder):
    image = smooth_frame()
    everything = encoder.encode(image, keep_ratio=1.0, scale=1)
    budget_bpp = (len(everything.bitstream) + 2) * 8 / image[..., 0].size
    result = encoder.encode(image, bpp=budget_bpp, scale=1)
    assert result.keep_ratio == 1.0 and len(result.bitstream) <= len(everything.bitstream) + 2


def test_auto_may_choose_a_finer_grid_only_when_allowed(encoder):
    import dataclasses

    from mridc.edge.rate import RateControl

    rate = encoder.rate
    assert rate.auto_grid(384, 512, 0.2, 5.0, 16) is None  # default max_auto_scale 1: never finer
    finer = RateControl(rate.prior, model_id=rate.model_id, codebook_bits=rate.codebook_bits, stride=16,
                        config=dataclasses.replace(rate.config, max_auto_scale=1.5))
    grid = finer.auto_grid(384, 512, 0.2, 5.0, 16)
    assert grid == (36, 48)
    assert finer.auto_grid(384, 512, 0.01, 5.0, 16) < (24, 32)


def test_auto_with_a_finest_scale_spends_a_large_budget(encoder):
    from mridc.edge.rate import auto_max_scale

    assert auto_max_scale("auto", 1.0) == 1.0 and auto_max_scale("auto:1.5", 1.0) == 1.5
    assert auto_max_scale(0.7, 1.0) is None
    for bad in ("auto:3", "auto:x", "autox"):
        with pytest.raises(ValueError):
            auto_max_scale(bad, 1.0)
    image = smooth_frame()
    plain = encoder.encode(image, bpp=0.3, scale="auto")
    finer = encoder.encode(image, bpp=0.3, scale="auto:1.5")
    assert plain.token_frame.grid_w == 16 and not plain.token_frame.resampled
    assert finer.token_frame.grid_w > 16 and finer.token_frame.resampled
    assert len(plain.bitstream) < len(finer.bitstream) <= finer.target_bytes
