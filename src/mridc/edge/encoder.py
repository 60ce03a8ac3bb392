"""The camera's encoder: frame -> token grid -> keep mask -> MRD bytes. No torch unless backend="torch".

    encoder = EdgeEncoder()                      # models/edge bundle, ONNX Runtime int8, 1 thread
    result = encoder.encode(frame_rgb, bpp=0.02) # or keep_ratio=0.5
    result.bitstream, result.bpp, result.token_frame, result.timings

Backends run only the convolutional encoder; the nearest-codeword search is numpy on every backend, so the
indices differ between backends only where int8 rounding moves a code vector across a decision boundary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.edge import mlm
from mridc.edge.keyregions import detect_key_regions
from mridc.shared.bitstream import TokenFrame, compress
from mridc.shared.entropy import TokenPrior
from mridc.shared.zoo import default_models_dir, model_id_from_codebook

BACKENDS = ("onnx", "onnx-fp32", "litert", "torch")
MAX_PIXELS = 16384 * 16384


class EncoderError(RuntimeError):
    """The encoder cannot run (missing bundle, backend unavailable); the message says what to do."""


@dataclass
class EncodeResult:
    bitstream: bytes
    token_frame: TokenFrame
    tokens: np.ndarray  # uint16 (gh, gw): every token, kept or not (for diagnostics and parity checks)
    priority: np.ndarray  # float32 (gh, gw)
    key_mask: np.ndarray  # bool (gh, gw)
    bpp: float
    keep_ratio: float
    target_bytes: int | None
    warning: str | None
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "bytes": len(self.bitstream), "bpp": round(self.bpp, 5), "keep_ratio": round(self.keep_ratio, 4),
            "grid": [int(self.token_frame.grid_h), int(self.token_frame.grid_w)],
            "kept_tokens": int(self.token_frame.keep_mask.sum()), "key_tokens": int(self.key_mask.sum()),
            "target_bytes": self.target_bytes, "model_id": f"{self.token_frame.model_id:08x}",
            "warning": self.warning, "timings_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
        }


def load_bundle(models_dir: Path) -> tuple[dict, np.ndarray, TokenPrior]:
    edge_dir = Path(models_dir) / "edge"
    manifest_path = edge_dir / "manifest.json"
    if not manifest_path.exists():
        raise EncoderError(f"no edge bundle at {edge_dir} (run `make export`, or set MRIDC_MODELS)")
    manifest = json.loads(manifest_path.read_text())
    codebook = np.load(edge_dir / "codebook.npy").astype(np.float32)
    if model_id_from_codebook(codebook) != manifest["model_id"]:
        raise EncoderError(f"{edge_dir}/codebook.npy does not match manifest.json's model id: rebuild the bundle")
    prior = TokenPrior.load(edge_dir / "token_prior.npz")
    return manifest, codebook, prior


class _OnnxRunner:
    def __init__(self, path: Path, threads: int):
        try:
            import onnxruntime as ort
        except Exception as exc:
            raise EncoderError(f"onnxruntime is not usable here ({exc}); try --backend litert") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


class _LiteRTRunner:
    def __init__(self, path: Path, threads: int, code_dim: int):
        self.code_dim = code_dim
        if not path.exists():
            raise EncoderError(f"{path} is missing (build it with `make export-litert`)")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter  # abandoned, but still on some images
            except ImportError as exc:
                raise EncoderError("LiteRT is not installed: pip install ai-edge-litert") from exc
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.shape = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        interp = self.interpreter
        inp = interp.get_input_details()[0]
        nhwc = inp["shape"].size == 4 and inp["shape"][-1] == 3
        data = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x
        if self.shape != data.shape:
            interp.resize_tensor_input(inp["index"], list(data.shape))
            interp.allocate_tensors()
            self.shape = data.shape
            inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], data.astype(np.float32))
        interp.invoke()
        out = interp.get_tensor(interp.get_output_details()[0]["index"])
        # NHWC output (code vectors last) -> NCHW like the other backends.
        return out.transpose(0, 3, 1, 2) if out.ndim == 4 and out.shape[-1] == self.code_dim != out.shape[1] else out


class _TorchRunner:
    def __init__(self, models_dir: Path, threads: int):
        try:
            import torch

            from mridc.cloud.zoo import load_model
        except ImportError as exc:
            raise EncoderError("the torch backend needs the cloud extra: pip install 'mridc[cloud]'") from exc
        torch.set_num_threads(threads)
        self.torch = torch
        self.encoder = load_model(Path(models_dir) / "tokenizer.pt", "tokenizer").encoder

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.encoder(self.torch.from_numpy(x)).numpy()


def nearest_codewords(codes: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (D, h, w), codebook (K, D), both L2-normalised -> (indices uint16 (h, w), 1 - cosine (h, w))."""
    d, h, w = codes.shape
    flat = codes.reshape(d, h * w)
    norms = np.linalg.norm(flat, axis=0, keepdims=True)
    flat = flat / np.maximum(norms, 1e-12)  # int8 outputs are only approximately unit length
    sims = codebook @ flat  # (K, h*w)
    idx = sims.argmax(axis=0)
    best = sims[idx, np.arange(h * w)]
    return idx.astype(np.uint16).reshape(h, w), (1.0 - best).astype(np.float32).reshape(h, w)


class EdgeEncoder:
    def __init__(self, models_dir: str | Path | None = None, backend: str = "onnx", threads: int = 1,
                 masking: mlm.MaskingConfig | None = None, use_faces: bool = False, key_sources: Sequence[str] = (),
                 scale: float | str | None = None):
        if backend not in BACKENDS:
            raise EncoderError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.models_dir = Path(models_dir) if models_dir else default_models_dir()
        self.manifest, self.codebook, self.prior = load_bundle(self.models_dir)
        self.model_id = int(self.manifest["model_id"])
        self.stride = int(self.manifest["stride"])
        self.codebook_bits = int(np.log2(self.manifest["codebook_size"]))
        self.token_bits_table = -np.log2(np.asarray(self.prior.freqs, np.float64) / 2**self.prior.precision_bits)
        self.backend = backend
        self.masking = masking or mlm.MaskingConfig()
        self.use_faces = use_faces
        self.key_sources = tuple(key_sources)
        self.default_scale = scale  # used when encode() is not given a scale
        # Share of tokens the auto scale plans to keep. 0.95 beat 0.8 and 0.9 in ad-hoc sweeps on 7-9 eval images
        # (not in the repo); the committed evidence is docs/results/rd/compare.md (auto vs full-grid masking).
        self.auto_min_keep = 0.95
        edge_dir = self.models_dir / "edge"
        if backend == "onnx":
            self.runner = _OnnxRunner(edge_dir / "encoder_int8.onnx", threads)
        elif backend == "onnx-fp32":
            self.runner = _OnnxRunner(edge_dir / "encoder_fp32.onnx", threads)
        elif backend == "litert":
            self.runner = _LiteRTRunner(edge_dir / "encoder_int8.tflite", threads, int(self.manifest["code_dim"]))
        else:
            self.runner = _TorchRunner(self.models_dir, threads)

    # -- stages -------------------------------------------------------------------------------------
    def tokenize(self, image_rgb: np.ndarray, grid: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame -> (encoder input frame, tokens uint16 (gh, gw), quantisation error (gh, gw)).

        With no `grid` the frame is padded to a multiple of the stride (full resolution). With a smaller
        `grid` it is resized to exactly grid x stride pixels (scaled mode: fewer tokens, the cloud upsamples)."""
        image_rgb = validate_frame(image_rgb)
        full = mlm.grid_shape_for(image_rgb.shape[0], image_rgb.shape[1], self.stride)
        if grid is None or tuple(grid) == tuple(full):
            grid = full
            padded = mlm.pad_to_grid(image_rgb, grid, self.stride)
        else:
            from PIL import Image

            # Pillow's box filter works in fixed point, so ARM and x86 get the same pixels (OpenCV's INTER_AREA
            # differed by one level on 0.07 % of pixels under the arm64 test).
            size = (grid[1] * self.stride, grid[0] * self.stride)
            padded = np.asarray(Image.fromarray(image_rgb).resize(size, Image.BOX))
        x = (padded.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
        codes = self.runner(np.ascontiguousarray(x))[0]
        tokens, qerr = nearest_codewords(codes.astype(np.float32), self.codebook)
        return padded, tokens, qerr

    def token_frame(self, frame_shape: tuple[int, int], tokens: np.ndarray, keep: np.ndarray, rate_q: int = 0
                    ) -> TokenFrame:
        h, w = frame_shape
        return TokenFrame(width=w, height=h, grid_h=tokens.shape[0], grid_w=tokens.shape[1], model_id=self.model_id,
                          codebook_bits=self.codebook_bits, keep_mask=keep, kept_tokens=tokens[keep].astype(np.uint16),
                          rate_q=rate_q)

    def pack(self, frame_shape: tuple[int, int], tokens: np.ndarray, keep: np.ndarray, rate_q: int = 0,
             token_coder: str = "auto") -> bytes:
        return compress(self.token_frame(frame_shape, tokens, keep, rate_q), self.prior, token_coder=token_coder)

    # -- the whole encode ---------------------------------------------------------------------------
    def scaled_grid(self, height: int, width: int, bpp: float | None, scale: float | str | None
                    ) -> tuple[int, int] | None:
        """The token grid for a resolution scale: None = full resolution.

        "auto" picks the largest grid (same aspect) at which the byte budget can still keep at least
        `auto_min_keep` of the tokens, estimated from the prior's entropy: with a weak predictor, dropping
        resolution costs less than dropping most tokens (docs/results/rd)."""
        if scale is None or scale == 1 or scale == 1.0:
            return None
        if scale == "auto":
            # First guess from the prior's entropy (coded bits per kept token came to ~0.92 x it on the eval set);
            # encode() refines it with this frame's own code lengths.
            return self._auto_grid(height, width, bpp, 0.92 * float(self.manifest.get("token_entropy_bits", 9.4)))
        s = float(scale)
        if not 0.05 <= s <= 1.0:
            raise ValueError(f"scale must be within 0.05..1 or 'auto', got {scale}")
        return max(1, round(height * s / self.stride)), max(1, round(width * s / self.stride))

    def _auto_grid(self, height: int, width: int, bpp: float | None, bits_per_token: float
                   ) -> tuple[int, int] | None:
        """Largest grid (same aspect) whose tokens, at `bits_per_token`, fill the budget at `auto_min_keep`."""
        if bpp is None:
            return None
        budget_bits = mlm.target_bytes_for_bpp(bpp, width, height) * 8 - 8 * 24
        fit = budget_bits / (bits_per_token * self.auto_min_keep)
        full_h, full_w = -(-height // self.stride), -(-width // self.stride)
        if fit >= full_h * full_w:
            return None
        factor = math.sqrt(max(fit, 1.0) / (full_h * full_w))
        return max(1, math.floor(full_h * factor)), max(1, math.floor(full_w * factor))

    def encode(self, image_rgb: np.ndarray, bpp: float | None = None, keep_ratio: float | None = None,
               rois: Sequence = (), previous_keep: int | None = None, scale: float | str | None = "default"
               ) -> EncodeResult:
        """Encode one RGB uint8 frame at a byte budget (`bpp`, bits per original pixel) or a keep ratio.

        Exactly one of bpp / keep_ratio; neither means keep every token. `scale` (a factor, or "auto" with a
        bpp) encodes a downscaled frame that the cloud upsamples. Raises ValueError on bad input or a budget
        below the smallest possible stream."""
        if bpp is not None and keep_ratio is not None:
            raise ValueError("give bpp or keep_ratio, not both")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image_rgb = validate_frame(image_rgb)
        h, w = image_rgb.shape[:2]
        scale = self.default_scale if scale == "default" else scale
        grid_request = self.scaled_grid(h, w, bpp, scale)
        padded, tokens, qerr = self.tokenize(image_rgb, grid_request)
        if scale == "auto" and bpp is not None:
            # Second pass with this frame's own mean code length (+1 bit for the mask), for one extra encoder run
            # on a smaller grid: +0.14 dB at 0.02 bpp, +0.22 dB at 0.03 over the one-pass estimate
            # (docs/results/rd: rd.json's auto rows vs rd_auto.json).
            refined = self._auto_grid(h, w, bpp, float(self.token_bits_table[tokens].mean()) + 1.0)
            if refined != grid_request:
                grid_request = refined
                padded, tokens, qerr = self.tokenize(image_rgb, grid_request)
        t1 = time.perf_counter()
        timings["encoder"] = t1 - t0
        grid = tokens.shape
        if grid_request is None:
            key_image, key_rois = padded[:h, :w], [_roi(r) for r in rois]
        else:  # ROIs are given in the original frame's pixels
            fy, fx = padded.shape[0] / h, padded.shape[1] / w
            key_image, key_rois = padded, [_scale_roi(_roi(r), fx, fy) for r in rois]
        keys = detect_key_regions(key_image, grid, self.stride, rois=key_rois,
                                  use_faces=self.use_faces, sources=self.key_sources)
        t2 = time.perf_counter()
        timings["key_regions"] = t2 - t1
        priority = mlm.priority_map(padded, grid, self.stride, quant_error=qerr, tokens=tokens,
                                    key_mask=keys.mask, config=self.masking)
        t3 = time.perf_counter()
        timings["map"] = t3 - t2
        target = None
        warning = None
        rate_q = 0
        if bpp is not None:
            if not (0 < bpp <= 64):
                raise ValueError(f"bpp must be in (0, 64], got {bpp}")
            target = mlm.target_bytes_for_bpp(bpp, w, h)
            rate_q = min(65535, round(bpp * 10000))
            keep, stream, info = mlm.fit_to_budget(
                tokens, priority, keys.mask, target,
                lambda m: self.pack((h, w), tokens, m, rate_q, token_coder="static"),
                self.masking, token_bits=self.token_bits_table[tokens], start_keep=previous_keep)
            warning = info.warning
            # The adaptive coder may beat the static one on this frame; never larger than what fitted.
            adaptive = self.pack((h, w), tokens, keep, rate_q, token_coder="adaptive")
            stream = adaptive if len(adaptive) < len(stream) else stream
        else:
            ratio = 1.0 if keep_ratio is None else float(keep_ratio)
            n_keep = mlm.keep_count_for_ratio(ratio, tokens.size)
            keep, warning = mlm.select_keep_mask(priority, n_keep, keys.mask, self.masking)
            rate_q = 0
            stream = self.pack((h, w), tokens, keep, rate_q)
        t4 = time.perf_counter()
        timings["select_and_code"] = t4 - t3
        timings["total"] = t4 - t0
        frame = self.token_frame((h, w), tokens, keep, rate_q)
        return EncodeResult(bitstream=stream, token_frame=frame, tokens=tokens, priority=priority, key_mask=keys.mask,
                            bpp=len(stream) * 8 / (w * h), keep_ratio=float(keep.mean()), target_bytes=target,
                            warning=warning, timings=timings)


def _scale_roi(roi, fx: float, fy: float):
    from mridc.edge.keyregions import Box, Polygon, parse_roi

    parsed = parse_roi(roi)
    if isinstance(parsed, Box):
        return {"box": [parsed.x0 * fx, parsed.y0 * fy, parsed.x1 * fx, parsed.y1 * fy]}
    if isinstance(parsed, Polygon):
        return {"polygon": [[x * fx, y * fy] for x, y in parsed.points]}
    return roi


def _roi(r):
    """Agent configs give (x, y, w, h) tuples; keyregions takes boxes as x0, y0, x1, y1 or dicts."""
    if isinstance(r, (tuple, list)) and len(r) == 4 and all(isinstance(v, (int, float)) for v in r):
        x, y, w, h = r
        return {"box": [x, y, x + w, y + h]}
    return r


def validate_frame(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(image).__name__}")  # noqa: TRY004 - bad input: exit 2
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"frame must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1 or image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ValueError(f"frame size {image.shape[1]}x{image.shape[0]} is outside 1..16384 per side")
    if image.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 from an image file; ValueError with the reason if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise ValueError(f"no such file: {path}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
