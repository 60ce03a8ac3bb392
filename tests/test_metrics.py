"""Metrics: PSNR, MS-SSIM, ROI fidelity, NIQE and the MobileNetV2 perceptual distance."""

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mridc.lab import metrics
from mridc.lab.datasets import data_root


def _texture(h=192, w=256, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0)
    img = np.stack([base, base[::-1], base[:, ::-1]], axis=2) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _photo():
    path = data_root() / "photos" / "eval" / "chelsea.png"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return np.asarray(Image.open(path).convert("RGB"))


def test_psnr_known_value():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[..., 0] = 10  # MSE = 100 / 3
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (100 / 3)))
    assert metrics.psnr(a, a) == math.inf


def test_shape_and_dtype_checked():
    with pytest.raises(ValueError):
        metrics.psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(TypeError):
        metrics.psnr(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.float32))


def test_ms_ssim_orders_distortions_and_handles_small_images():
    ref = _texture()
    rng = np.random.default_rng(1)
    mild = np.clip(ref + rng.normal(0, 5, ref.shape), 0, 255).astype(np.uint8)
    strong = np.clip(ref + rng.normal(0, 40, ref.shape), 0, 255).astype(np.uint8)
    assert metrics.ms_ssim(ref, ref) == pytest.approx(1.0, abs=1e-5)
    assert metrics.ms_ssim(ref, mild) > metrics.ms_ssim(ref, strong)
    assert metrics.ms_ssim_window(192, 256) == 11 and metrics.ms_ssim_window(40, 40) == 3
    assert metrics.ms_ssim_window(30, 300) is None
    small = metrics.ms_ssim(ref[:40, :40], strong[:40, :40])  # fewer scales, still a valid score
    assert 0 < small < 1


def test_roi_metrics_see_damage_inside_the_box_only():
    ref = _texture()
    dec = ref.copy()
    dec[50:100, 60:120] = 0
    roi = metrics.roi_metrics(ref, dec, [[60, 50, 120, 100], [500, 500, 600, 600]])  # second box is outside
    assert len(roi["boxes"]) == 1
    assert roi["roi_psnr"] < 10 and roi["outside_psnr"] == math.inf
    assert roi["roi_fraction"] == pytest.approx(50 * 60 / (192 * 256))
    assert metrics.roi_metrics(ref, dec, [])["roi_psnr"] is None


def test_niqe_prefers_the_original_to_blur_and_noise():
    from mridc.lab.niqe import niqe

    photo = _photo()
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(2)))
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
    original = niqe(photo)
    assert original < niqe(blurred)
    assert original < niqe(noisy)
    with pytest.raises(ValueError):
        niqe(photo[:90, :90])


def test_matlab_imresize_half():
    from mridc.lab.niqe import imresize_matlab

    # MATLAB: imresize(reshape(0:15, 4, 4)', 0.5) (bicubic, antialiased)
    out = imresize_matlab(np.arange(16.0).reshape(4, 4), 0.5)
    np.testing.assert_allclose(out, [[2.3046875, 4.3828125], [10.6171875, 12.6953125]], atol=1e-6)


@pytest.fixture(scope="module")
def perceptual():
    from mridc.lab.perceptual import PerceptualDistance, default_weights_path

    if not default_weights_path().is_file():
        pytest.skip("MobileNetV2 weights not present")
    return PerceptualDistance(backend="mnv2")


def test_mobilenet_weights_load_and_classify(perceptual):
    photo = np.asarray(Image.fromarray(_photo()).resize((224, 224), Image.Resampling.BILINEAR))
    # chelsea is a tabby cat: ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat.
    assert set(perceptual.classify(photo, top=3)) & {281, 282, 285}
    assert perceptual.name == "MNv2-LPIPS (uncalibrated)" and not perceptual.standard


def test_perceptual_distance_orders_distortions(perceptual):
    photo = np.asarray(Image.fromarray(_photo()).resize((240, 160), Image.Resampling.LANCZOS))
    h, w = photo.shape[:2]
    mild = np.asarray(Image.fromarray(photo).resize((w // 2, h // 2)).resize((w, h)))
    strong = np.asarray(Image.fromarray(photo).resize((w // 8, h // 8)).resize((w, h)))
    assert perceptual(photo, photo) == pytest.approx(0.0, abs=1e-6)
    assert 0 < perceptual(photo, mild) < perceptual(photo, strong)
