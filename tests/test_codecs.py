"""Classical codecs under a bit budget: honest byte counts, budget respected, round trip of payloads."""

import numpy as np
import pytest

from mridc.lab import codecs
from mridc.lab.metrics import psnr


def _image(h=96, w=128):
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    img = np.stack([x * 2, y * 2, (x + y)], axis=2) + 40 * np.sin(x / 5.0)[..., None] + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


AVAILABLE = [name for name in codecs.CLASSICAL if codecs.availability(name) is None]


@pytest.mark.parametrize("name", AVAILABLE)
def test_budget_respected_and_payload_decodes(name):
    image = _image()
    codec = codecs.make_codec(name, factors=(1.0, 2.0, 4.0))
    budget = int(0.25 * image.shape[0] * image.shape[1])
    payload, decoded, info = codec.encode(image, budget)
    assert isinstance(codec, codecs.Codec)
    assert len(payload) * 8 == info["bits"] <= budget
    assert info["bpp"] == pytest.approx(info["bits"] / (96 * 128))
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    np.testing.assert_array_equal(codec.decode(payload), decoded)  # the payload alone is enough
    assert codec.quality_range[0] <= info["quality"] <= codec.quality_range[1]
    assert psnr(image, decoded) > 15


@pytest.mark.parametrize("name", AVAILABLE)
def test_more_bits_never_worse(name):
    image = _image()
    codec = codecs.make_codec(name, factors=(1.0, 2.0, 4.0))
    low = codec.encode(image, int(0.4 * image.size / 3))[1]
    high = codec.encode(image, int(1.2 * image.size / 3))[1]
    assert psnr(image, high) >= psnr(image, low) - 0.01


def test_downscaled_payload_carries_size_and_is_counted():
    image = _image()
    codec = codecs.make_codec("webp", factors=(4.0,))
    payload, decoded, info = codec.encode(image, 4000)
    assert info["downscale"] == 4.0 and info["coded_size"] == [32, 24]
    assert payload[-4:] == codecs.SIZE_TRAILER.pack(128, 96)
    np.testing.assert_array_equal(codec.decode(payload), decoded)


def test_full_size_payload_is_a_plain_file_without_metadata():
    from io import BytesIO

    from PIL import Image

    image = _image()
    codec = codecs.make_codec("jpeg", factors=(1.0,))
    payload, _, _ = codec.encode(image, 40000)
    with Image.open(BytesIO(payload)) as im:
        assert im.format == "JPEG" and im.size == (128, 96)
        assert "icc_profile" not in im.info and "exif" not in im.info


def test_too_small_budget_raises():
    with pytest.raises(codecs.BudgetTooSmall):
        codecs.make_codec("jpeg").encode(_image(), 64)


def test_jxl_skips_cleanly_when_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "pillow_jxl":
            raise ImportError("no")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    reason = codecs.availability("jxl")
    assert reason and "skipped" in reason


def test_avif_obu_drops_the_container_and_decodes_identically():
    if codecs.availability("avif"):
        pytest.skip("no AVIF in this Pillow")
    image = _image()
    plain, bare = codecs.make_codec("avif"), codecs.make_codec("avif-obu")
    file_bytes, obu_bytes = plain.encode_file(image, 40), bare.encode_file(image, 40)
    assert len(file_bytes) - len(obu_bytes) > 200  # the HEIF boxes are not sent
    np.testing.assert_array_equal(plain.decode_file(file_bytes), bare.decode_file(obu_bytes))
