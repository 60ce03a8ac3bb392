"""ONNX Runtime for the cloud decoder's networks: same pictures as PyTorch up to float rounding, cached exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mridc.cloud.accel import OrtModule, resolve_backend
from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder
from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
from mridc.edge.encoder import EdgeEncoder
from mridc.lab.metrics import psnr


def test_backend_names_resolve():
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="decoder backend"):
        resolve_backend("tensorrt", "cpu")


def test_an_exported_module_matches_torch_at_any_size_and_is_cached(tmp_path):
    torch.manual_seed(0)
    decoder = VQTokenizer(tiny_tokenizer_config()).decoder.eval()
    ort_decoder = OrtModule(decoder, [torch.zeros(1, 8, 4, 6)], {0: (0, 2, 3)}, cache_dir=tmp_path, name="dec")
    for shape in [(1, 8, 3, 5), (2, 8, 7, 4)]:
        z = torch.randn(shape)
        with torch.no_grad():
            expected = decoder(z)
        assert torch.allclose(ort_decoder(z), expected, atol=1e-4)
    assert len(list(tmp_path.glob("dec-*.onnx"))) == 1
    OrtModule(decoder, [torch.zeros(1, 8, 4, 6)], {0: (0, 2, 3)}, cache_dir=tmp_path, name="dec")
    assert len(list(tmp_path.glob("dec-*.onnx"))) == 1  # the same weights reuse the export
    with torch.no_grad():
        decoder.conv_out.bias.add_(0.1)
    OrtModule(decoder, [torch.zeros(1, 8, 4, 6)], {0: (0, 2, 3)}, cache_dir=tmp_path, name="dec")
    assert len(list(tmp_path.glob("dec-*.onnx"))) == 2  # changed weights never meet a stale export
    with pytest.raises(AttributeError):
        _ = ort_decoder.no_such_attribute


def test_the_shipped_decoder_through_onnxruntime_gives_the_same_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("MRIDC_CACHE", str(tmp_path))
    reference = MRIDCDecoder.from_models()
    fast = MRIDCDecoder.from_models(backend="onnxruntime")
    assert fast.backend == "onnxruntime" and reference.backend == "torch"
    rng = np.random.default_rng(0)
    image = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    stream = bytes(EdgeEncoder.from_bundle(backend="onnx").encode(image, bpp=0.3).bitstream)
    frame = reference.validate(stream)
    for settings in (DecodeSettings(realism=0.0), DecodeSettings(realism=0.5, steps=2)):
        a = reference.decode_frames([frame], settings)[0].image
        b = fast.decode_frames([frame], settings)[0].image
        assert a.shape == b.shape and psnr(a, b) > 50


def test_the_predictor_gets_one_export_per_grid_shape(tmp_path):
    from mridc.cloud.accel import accelerate_predictor
    from mridc.cloud.predictor import BidirectionalTokenPredictor, PredictorConfig, WindowedPredictor

    torch.manual_seed(0)
    predictor = BidirectionalTokenPredictor(PredictorConfig(codebook_size=64, dim=32, depth=2, heads=4)).eval()
    windowed = WindowedPredictor(predictor, window=8, overlap=2)
    tokens = torch.randint(0, 64, (1, 6, 7))
    keep = torch.rand(1, 6, 7) < 0.5
    big_tokens, big_keep = torch.randint(0, 64, (1, 12, 20)), torch.rand(1, 12, 20) < 0.5
    with torch.no_grad():
        expected, expected_big = windowed(tokens, keep), windowed(big_tokens, big_keep)
    accelerate_predictor(windowed, cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.allclose(windowed(tokens, keep), expected, atol=1e-4)
        assert torch.allclose(windowed(big_tokens, big_keep), expected_big, atol=1e-4)
    # Two shapes seen: the small grid, and the 8x8 window of the big one (its edge windows are 8x8 too).
    assert len(list(tmp_path.glob("predictor-*.onnx"))) == 2
