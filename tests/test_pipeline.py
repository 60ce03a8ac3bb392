"""Round trips through the shipped models: edge encode -> MRD bytes -> cloud decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.pipeline import (
    FILLS,
    DecodeSettings,
    MRIDCDecoder,
    NearestFill,
    make_fill,
    nearest_kept_fill,
)
from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
from mridc.edge.encoder import EdgeEncoder, nearest_codewords
from mridc.shared.bitstream import BitstreamError, decompress
from mridc.shared.zoo import default_shared_data_dir

EVAL = default_shared_data_dir() / "photos" / "eval"


@pytest.fixture(scope="module")
def encoder():
    return EdgeEncoder.from_bundle()


@pytest.fixture(scope="module")
def decoder():
    torch.set_num_threads(2)
    return MRIDCDecoder.from_models()


def _photo(h=128, w=176) -> np.ndarray:
    from PIL import Image

    with Image.open(EVAL / "coffee.png") as im:
        return np.asarray(im.convert("RGB").resize((w, h)))


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (128, 176), (61, 200)])
def test_any_size_round_trips_to_the_input_size(encoder, decoder, shape):
    img = _photo(*shape) if min(shape) > 1 else np.full((*shape, 3), 128, np.uint8)
    result = encoder.encode(img, keep_ratio=0.6)
    out = decoder.decode(result.bitstream, realism=0.0)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_kept_tokens_reach_the_cloud_unaltered(encoder, decoder):
    img = _photo()
    result = encoder.encode(img, bpp=0.03)
    frame = decoder.validate(result.bitstream)
    assert np.array_equal(frame.keep_mask, result.token_frame.keep_mask)
    assert np.array_equal(frame.kept_tokens, result.tokens[result.token_frame.keep_mask])
    for fill in ("bpcg", "maskgit", "nearest", "mode"):
        out = decoder.decode_frames([frame], DecodeSettings(realism=0.0, fill=fill))[0]
        assert np.array_equal(out.completed_tokens[frame.keep_mask], frame.kept_tokens), fill


def test_full_tokens_decode_close_to_the_input(encoder, decoder):
    img = _photo()
    out = decoder.decode(encoder.encode(img).bitstream, realism=0.0)
    psnr = 10 * np.log10(255**2 / np.mean((out.astype(float) - img) ** 2))
    assert psnr > 16  # a real reconstruction, not noise (the shipped tokenizer gives ~20 dB here)


def test_same_seed_same_pixels_and_batch_equals_single(encoder, decoder):
    a = encoder.encode(_photo(), bpp=0.03).bitstream
    b = encoder.encode(_photo(96, 128), keep_ratio=0.5).bitstream
    one = decoder.decode(a, realism=0.5, seed=3, steps=2)
    assert np.array_equal(one, decoder.decode(a, realism=0.5, seed=3, steps=2))
    batch = decoder.decode_batch([a, b, a], realism=0.5, seed=3, steps=2)
    assert np.abs(batch[0].astype(int) - one).max() <= 1
    assert np.array_equal(batch[0], batch[2])
    assert batch[1].shape == (96, 128, 3)
    other = decoder.decode(a, realism=0.5, seed=4, steps=2)
    assert not np.array_equal(one, other)


def test_realism_zero_is_deterministic_tokenizer_decode(encoder, decoder):
    stream = encoder.encode(_photo(), keep_ratio=1.0).bitstream
    assert np.array_equal(decoder.decode(stream, realism=0.0, seed=1), decoder.decode(stream, realism=0.0, seed=2))


def test_stream_from_another_model_is_refused(encoder):
    torch.manual_seed(0)
    other = MRIDCDecoder(VQTokenizer(tiny_tokenizer_config()), prior=encoder.prior)
    stream = encoder.encode(_photo(), keep_ratio=0.5).bitstream
    with pytest.raises(BitstreamError, match="model"):
        other.validate(stream)


def test_rate_control_meets_budget_and_is_deterministic(encoder):
    img = _photo(256, 384)
    for bpp in (0.015, 0.02, 0.03):
        r = encoder.encode(img, bpp=bpp)
        assert len(r.bitstream) <= r.target_bytes
        assert r.bpp <= bpp
        assert r.bitstream == encoder.encode(img, bpp=bpp).bitstream
        assert decompress(r.bitstream, encoder.prior).model_id == encoder.model_id


def test_budget_below_header_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match="below the smallest"):
        encoder.encode(_photo(), bpp=0.0005)


def test_key_regions_are_kept_first(encoder):
    img = _photo(256, 384)
    r = encoder.encode(img, bpp=0.015, rois=[{"box": [0, 0, 96, 64]}])
    assert r.key_mask[:4, :6].all()
    assert r.token_frame.keep_mask[:4, :6].all()


def test_bad_frames_are_rejected_with_clear_errors(encoder):
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        encoder.encode(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="size"):
        encoder.encode(np.zeros((0, 8, 3), np.uint8))


def test_nearest_codeword_search_matches_brute_force():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(32, 8)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    codes = rng.normal(size=(8, 3, 5)).astype(np.float32)
    idx, err = nearest_codewords(codes, codebook)
    flat = codes.reshape(8, -1).T
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    assert np.array_equal(idx.ravel(), np.argmax(flat @ codebook.T, axis=1))
    assert (err >= -1e-6).all() and (err <= 2).all()


def test_nearest_kept_fill_copies_neighbours():
    tokens = np.arange(9).reshape(3, 3)
    keep = np.zeros((3, 3), bool)
    keep[0, 0] = keep[2, 2] = True
    filled = nearest_kept_fill(tokens, keep)
    assert filled[0, 1] == 0 and filled[2, 1] == 8 and filled[0, 0] == 0 and filled[2, 2] == 8


def test_scaled_mode_meets_budget_and_decodes_to_the_frame_size(encoder, decoder):
    img = _photo(256, 384)
    for scale in (0.5, "auto"):
        r = encoder.encode(img, bpp=0.02, scale=scale)
        assert len(r.bitstream) <= r.target_bytes
        frame = decoder.validate(r.bitstream)
        assert (frame.width, frame.height) == (384, 256)
        out = decoder.decode(r.bitstream, realism=0.0)
        assert out.shape == img.shape
    half = encoder.encode(img, keep_ratio=1.0, scale=0.5)
    assert half.tokens.shape == (8, 12)
    with pytest.raises(ValueError, match="scale"):
        encoder.encode(img, keep_ratio=1.0, scale=2.5)  # above MAX_RESAMPLE_SCALE (2)


def test_decode_frames_is_the_decode_of_bytes(encoder, decoder):
    stream = encoder.encode(_photo(), bpp=0.03).bitstream
    frame = decoder.validate(stream)
    out = decoder.decode_frames([frame], DecodeSettings(realism=0.5, seed=2, steps=2))[0]
    assert np.array_equal(out.image, decoder.decode(stream, realism=0.5, seed=2, steps=2))
    assert out.frame is frame and set(out.timings) == {"tokens", "render"}


def test_fills_are_interchangeable_parts(encoder, decoder):
    assert FILLS[0] == "bpcg" and set(FILLS) == set(decoder.fills) == {"bpcg", "maskgit", "nearest", "mode"}
    frame = decoder.validate(encoder.encode(_photo(), keep_ratio=0.5).bitstream)
    settings = DecodeSettings(realism=0.0, fill="nearest")
    # A decoder built from one fill uses it by default and gives the same pixels as the registry's fill.
    only_nearest = MRIDCDecoder(decoder.tokenizer, NearestFill.from_parts(decoder.tokenizer), None, decoder.prior)
    assert only_nearest.default_fill == "nearest"
    assert np.array_equal(only_nearest.decode_frames([frame], DecodeSettings(realism=0.0))[0].image,
                          decoder.decode_frames([frame], settings)[0].image)
    with pytest.raises(ValueError, match="unknown fill"):
        only_nearest.decode_frames([frame], DecodeSettings(fill="bpcg"))
    with pytest.raises(ValueError, match="unknown fill"):
        make_fill("telepathy", decoder.tokenizer)
    assert isinstance(make_fill("bpcg", decoder.tokenizer, predictor=None), NearestFill)  # no predictor shipped


def test_the_refiner_scheduler_can_be_swapped(encoder, decoder):
    stream = encoder.encode(_photo(), keep_ratio=0.6).bitstream
    same = MRIDCDecoder.from_models(scheduler=DDIMScheduler())
    other = MRIDCDecoder.from_models(scheduler=DDIMScheduler(num_train_timesteps=500))
    reference = decoder.decode(stream, realism=0.5, seed=1, steps=2)
    assert np.array_equal(same.decode(stream, realism=0.5, seed=1, steps=2), reference)
    assert not np.array_equal(other.decode(stream, realism=0.5, seed=1, steps=2), reference)
    no_refiner = MRIDCDecoder(decoder.tokenizer, decoder.fills, None, decoder.prior)
    assert np.array_equal(no_refiner.decode(stream, realism=1.0), decoder.decode(stream, realism=0.0))


def test_refining_a_kept_preview_equals_a_refined_decode(decoder):
    rng = np.random.default_rng(5)
    image = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    frame = decoder.validate(bytes(EdgeEncoder.from_bundle(backend="onnx").encode(image, bpp=0.2).bitstream))
    preview_settings = DecodeSettings(realism=0.0)
    refined_settings = DecodeSettings(realism=0.5, steps=2, seed=3)
    (preview,) = decoder.decode_frames([frame], preview_settings, keep_intermediate=True)
    assert preview.decoded is not None and preview.trust.shape == (frame.grid_h, frame.grid_w)
    (again,) = decoder.decode_frames([frame], preview_settings)
    assert again.decoded is None and np.array_equal(again.image, preview.image)
    (refined,) = decoder.refine_outputs([preview], refined_settings)
    (direct,) = decoder.decode_frames([frame], refined_settings)
    assert np.array_equal(refined.image, direct.image)
    assert not np.array_equal(refined.image, preview.image)
    with pytest.raises(ValueError, match="keep_intermediate"):
        decoder.refine_outputs([again], refined_settings)
