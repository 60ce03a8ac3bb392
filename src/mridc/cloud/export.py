"""Build the edge bundle (`models/edge/`) from the shipped tokenizer: what a camera needs, and no torch.

- encoder_fp32.onnx: the encoder graph (image in [-1, 1] -> L2-normalised code vectors), any H, W multiple of
  the stride;
- encoder_int8.onnx: ONNX Runtime static QDQ int8, calibrated on training crops;
- codebook.npy: the L2-normalised codebook (float32), searched in numpy on the device;
- token_prior.npz: integer token frequencies counted on training frames (the entropy coder's static prior);
- manifest.json (`mridc.shared.protocol.EdgeManifest`): model id, stride, codebook size, files and their
  SHA-256, how the int8 file was made.

The LiteRT int8 file is built by `tools/litert_convert.py` in its own environment (litert-torch is a 1.2 GB
install that the cloud and edge environments should not carry).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mridc.cloud.zoo import load_model, tokenizer_codebook
from mridc.shared.protocol import EdgeManifest, InputSpec, Int8Notes, OutputSpec, bundle_files
from mridc.shared.zoo import model_id_from_codebook

INPUT_NAME, OUTPUT_NAME = "image", "codes"
# The shipped manifest's order (tools/litert_convert.py adds the .tflite file last).
BUNDLE_FILES = ("encoder_fp32.onnx", "encoder_int8.onnx", "codebook.npy", "token_prior.npz", "encoder_int8.tflite")
# What quantize_int8 keeps in float, in words, for the manifest.
INT8_FLOAT_NODES = "stem conv, code projection, L2 normalisation"


def export_onnx(encoder: torch.nn.Module, path: Path, example_hw=(512, 768)) -> None:
    encoder = encoder.eval().float()
    x = torch.zeros(1, 3, *example_hw)
    # The TorchScript exporter gives plain Conv/Relu nodes with symbolic H, W; ORT quantises them cleanly.
    torch.onnx.export(
        encoder, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=17,
        dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "h", 3: "w"}},
        dynamo=False,
    )


def calibration_frames(shared: Path, count: int, size=(512, 768), seed: int = 0) -> list[np.ndarray]:
    """Crops of the shared training split (never eval images), as float32 NCHW in [-1, 1]. Not the built corpus:
    the bundle must rebuild to the same bytes wherever `mridc-cloud data` has run."""
    from mridc.cloud.data import CropSampler, parse_source, shared_train_sources

    images = [img for spec in shared_train_sources(shared) for img in parse_source(spec)]
    rng = random.Random(seed)
    picks = rng.sample(images, min(count, len(images)))
    out = []
    for img in picks:
        sampler = CropSampler([img], min(size), torch.device("cpu"), min_scale=0.5)
        crop = sampler.sample(1, rng)  # square crop, then resize to the calibration frame size
        crop = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=False)
        out.append(crop.numpy().astype(np.float32))
    return out


CALIB_METHODS = ("minmax", "percentile", "entropy")


def quantize_int8(fp32_path: Path, int8_path: Path, frames: list[np.ndarray], method: str = "minmax") -> None:
    """Static QDQ int8. `method`: how activation ranges are calibrated. minmax (moving average) made the shipped
    bundle; percentile (99.999) kept more tokens equal to fp32 on the EMA-codebook candidate (models/README.md)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(frames)

        def get_next(self):
            frame = next(self.it, None)
            return None if frame is None else {INPUT_NAME: frame}

    import onnx

    pre = int8_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    # The stem (3 input channels, cheap) and the 1x1 projection to the code vectors stay float, as does the
    # final normalisation: they decide the nearest codeword, and int8 there cost ~2 points of token agreement.
    quantize_static(str(pre), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "Relu", "Add"], nodes_to_exclude=[convs[0], convs[-1]],
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method],
                    extra_options={"CalibMovingAverage": True} if method == "minmax" else {})
    pre.unlink(missing_ok=True)


def count_token_prior(tokenizer, shared: Path, max_side: int = 1024):
    """Token histogram over training frames at camera-like resolution -> integer prior."""
    from mridc.cloud.data import parse_source, shared_train_sources
    from mridc.shared.entropy import TokenPrior

    counts = np.zeros(tokenizer.cfg.codebook_size, np.int64)
    stride = tokenizer.cfg.stride
    with torch.no_grad():
        for spec in shared_train_sources(shared):
            images = parse_source(spec)
            if len(images) > 60:  # video: every 8th frame is plenty
                images = images[::8]
            for img in images:
                t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
                h, w = t.shape[-2:]
                f = min(1.0, max_side / max(h, w))
                nh, nw = max(stride, int(h * f) // stride * stride), max(stride, int(w * f) // stride * stride)
                t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="area")
                idx = tokenizer.encode_indices(t)
                counts += np.bincount(idx.flatten().numpy(), minlength=counts.size)
    return TokenPrior.from_counts(counts), counts


def build_edge_bundle(tokenizer_path: Path, out_dir: Path, shared: Path, calib_count: int = 24,
                      log=print, calib_method: str = "minmax") -> EdgeManifest:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model(tokenizer_path, "tokenizer")
    codebook = tokenizer_codebook(tokenizer)
    np.save(out_dir / "codebook.npy", codebook)
    model_id = model_id_from_codebook(codebook)
    log(f"model id {model_id:08x}; exporting ONNX fp32")
    export_onnx(tokenizer.encoder, out_dir / "encoder_fp32.onnx")
    frames = calibration_frames(shared, calib_count)
    log(f"calibrating int8 on {len(frames)} training crops ({calib_method})")
    quantize_int8(out_dir / "encoder_fp32.onnx", out_dir / "encoder_int8.onnx", frames, calib_method)
    log("counting the token prior on training frames")
    prior, counts = count_token_prior(tokenizer, shared)
    prior.save(out_dir / "token_prior.npz")
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    manifest = EdgeManifest(
        model_id=model_id, stride=tokenizer.cfg.stride, codebook_size=tokenizer.cfg.codebook_size,
        code_dim=tokenizer.cfg.code_dim,
        input=InputSpec(name=INPUT_NAME, layout="NCHW", range=(-1.0, 1.0), pad="edge-replicate to stride"),
        output=OutputSpec(name=OUTPUT_NAME, layout="NCHW", normalised=True),
        token_entropy_bits=round(entropy, 3), codes_used_in_prior_data=int((counts > 0).sum()),
        files=bundle_files(out_dir, BUNDLE_FILES),
        int8=Int8Notes(calibration=f"{len(frames)} training crops (mridc.cloud.export.calibration_frames, seed 0)"
                       + ("" if calib_method == "minmax" else f", {calib_method} ranges"),
                       float_nodes=INT8_FLOAT_NODES),
    )
    manifest.write(out_dir / "manifest.json")
    log(f"edge bundle written to {out_dir}")
    return manifest
