"""The camera's encoder: frame -> token grid -> keep mask -> MRD bytes, composed from five parts. No torch.

    encoder = EdgeEncoder.from_bundle()          # models/edge bundle, ONNX Runtime int8, 1 thread
    result = encoder.encode(frame_rgb, bpp=0.02) # or keep_ratio=0.5
    result.bitstream, result.bpp, result.token_frame, result.timings

The parts (each replaceable; `from_bundle` builds the shipped composition):
- runner (`mridc.edge.runners`): the convolutional encoder on one runtime, pixels -> code vectors;
- quantizer (`mridc.edge.quantizer`): code vectors -> nearest codeword indices (numpy on every backend, so
  indices differ between backends only where int8 rounding moves a vector across a decision boundary);
- priority (`mridc.edge.masking.MapPriority`): key regions and the per-token priority map;
- policy (`mridc.edge.masking.MapGuidedSelection`): the order in which tokens are kept;
- rate (`mridc.edge.rate.RateControl`): the grid for a scale, the byte budget, and the entropy-coded stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.edge import mlm
from mridc.edge.keyregions import roi_from_config, scale_roi
from mridc.edge.masking import KeyRegionConfig, MapGuidedSelection, MapPriority, SelectionPolicy
from mridc.edge.quantizer import VectorQuantizer, nearest_codewords
from mridc.edge.rate import MAX_BPP, RateConfig, RateControl, auto_max_scale
from mridc.edge.runners import RUNNERS, EncoderError, EncoderRunner, RunnerConfig, RunnerRegistry
from mridc.shared import protocol
from mridc.shared.bitstream import TokenFrame
from mridc.shared.entropy import TokenPrior
from mridc.shared.zoo import default_models_dir, model_id_from_codebook

MAX_PIXELS = 16384 * 16384


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


def load_bundle(models_dir: Path) -> tuple[protocol.EdgeManifest, np.ndarray, TokenPrior]:
    edge_dir = Path(models_dir) / "edge"
    manifest_path = edge_dir / "manifest.json"
    if not manifest_path.exists():
        raise EncoderError(f"no edge bundle at {edge_dir} (run `make export`, or set MRIDC_MODELS)")
    try:
        manifest = protocol.EdgeManifest.read(manifest_path)
    except protocol.ManifestError as exc:
        raise EncoderError(f"{manifest_path}: {exc}") from exc
    codebook = np.load(edge_dir / "codebook.npy").astype(np.float32)
    if model_id_from_codebook(codebook) != manifest.model_id:
        raise EncoderError(f"{edge_dir}/codebook.npy does not match manifest.json's model id: rebuild the bundle")
    prior = TokenPrior.load(edge_dir / "token_prior.npz")
    return manifest, codebook, prior


class EdgeEncoder:
    """Runner -> quantizer -> priority -> policy -> rate. `from_bundle` builds the shipped composition."""

    def __init__(self, runner: EncoderRunner, quantizer: VectorQuantizer, priority: MapPriority,
                 policy: SelectionPolicy, rate: RateControl, *, stride: int, scale: float | str | None = None,
                 backend: str = "custom"):
        self.runner = runner
        self.quantizer = quantizer
        self.priority = priority
        self.policy = policy
        self.rate = rate
        self.stride = int(stride)  # pixels per token side: the runner's downsampling
        self.default_scale = scale  # used when encode() is not given a scale
        self.backend = backend  # a label for reports

    @classmethod
    def from_bundle(cls, models_dir: str | Path | None = None, backend: str = "onnx", threads: int = 1,
                    masking: mlm.MaskingConfig | None = None, use_faces: bool = False,
                    key_sources: Sequence[str] = (), scale: float | str | None = None,
                    runners: RunnerRegistry = RUNNERS) -> EdgeEncoder:
        """The shipped encoder from a models folder (default: $MRIDC_MODELS or the repository's models/)."""
        models_dir = Path(models_dir) if models_dir else default_models_dir()
        if backend not in runners.names():
            raise EncoderError(f"unknown backend {backend!r}; choose one of {', '.join(runners.names())}")
        manifest, codebook, prior = load_bundle(models_dir)
        runner = runners.create(backend, RunnerConfig(models_dir, threads, manifest.code_dim))
        masking = masking or mlm.MaskingConfig()
        rate = RateControl(prior, model_id=manifest.model_id, stride=manifest.stride,
                           codebook_bits=int(np.log2(manifest.codebook_size)), search=masking,
                           config=RateConfig.for_manifest(manifest))
        return cls(runner, VectorQuantizer(codebook),
                   MapPriority(masking, KeyRegionConfig(use_faces, tuple(key_sources))),
                   MapGuidedSelection(masking), rate, stride=manifest.stride, scale=scale, backend=backend)

    # -- what callers read off the encoder -----------------------------------------------------------------
    @property
    def prior(self) -> TokenPrior:
        return self.rate.prior

    @property
    def model_id(self) -> int:
        return self.rate.model_id

    # -- stages -------------------------------------------------------------------------------------
    def tokenize(self, image_rgb: np.ndarray, grid: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame -> (encoder input frame, tokens uint16 (gh, gw), quantisation error (gh, gw)).

        With no `grid` the frame is padded to a multiple of the stride (full resolution). With a smaller
        `grid` it is resized to exactly grid x stride pixels (scaled mode: fewer tokens, the cloud upsamples)."""
        padded, codes = self.features(image_rgb, grid)
        tokens, qerr = self.quantizer.nearest(codes)
        return padded, tokens, qerr

    def features(self, image_rgb: np.ndarray, grid: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frame -> (encoder input frame, code vectors float32 (D, gh, gw)) before quantisation."""
        padded = self.input_frame(image_rgb, grid)
        x = (padded.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
        return padded, np.asarray(self.runner(np.ascontiguousarray(x))[0], np.float32)

    def input_frame(self, image_rgb: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
        """The frame the network sees for `grid`: padded to the stride (full resolution) or resized to it."""
        image_rgb = validate_frame(image_rgb)
        full = protocol.grid_shape(image_rgb.shape[1], image_rgb.shape[0], self.stride)
        if grid is None or tuple(grid) == tuple(full):
            return mlm.pad_to_grid(image_rgb, full, self.stride)
        return protocol.resize_for_grid(image_rgb, grid, self.stride)

    def tokens(self, image_rgb: np.ndarray) -> np.ndarray:
        """The full-resolution token grid, uint16 (gh, gw): what backends are compared on."""
        return self.tokenize(image_rgb)[1]

    # -- the whole encode ---------------------------------------------------------------------------
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
        grid_request = self.rate.scaled_grid(h, w, bpp, scale, self.stride)
        padded, tokens, qerr = self.tokenize(image_rgb, grid_request)
        finest = auto_max_scale(scale, self.rate.config.max_auto_scale)
        if finest is not None and bpp is not None:
            refined = self.rate.refined_auto_grid(h, w, bpp, tokens, self.stride, finest)
            if refined != grid_request:
                grid_request = refined
                padded, tokens, qerr = self.tokenize(image_rgb, grid_request)
        t1 = time.perf_counter()
        timings["encoder"] = t1 - t0
        grid = tokens.shape
        if grid_request is None:
            key_image, key_rois = padded[:h, :w], [roi_from_config(r) for r in rois]
        else:  # ROIs are given in the original frame's pixels
            fy, fx = padded.shape[0] / h, padded.shape[1] / w
            key_image, key_rois = padded, [scale_roi(roi_from_config(r), fx, fy) for r in rois]
        keys = self.priority.key_regions(key_image, grid, self.stride, key_rois)
        t2 = time.perf_counter()
        timings["key_regions"] = t2 - t1
        priority = self.priority.score(padded, grid, self.stride, quant_error=qerr, tokens=tokens,
                                       key_mask=keys.mask)
        t3 = time.perf_counter()
        timings["map"] = t3 - t2
        target = None
        if bpp is not None:
            if not (0 < bpp <= MAX_BPP):
                raise ValueError(f"bpp must be in (0, {MAX_BPP}], got {bpp}")
            target = self.rate.target_bytes(bpp, w, h)
            rate_q = self.rate.rate_q(bpp)
            order = self.policy.order(priority, keys.mask)
            keep, stream, info = self.rate.fit((h, w), tokens, order, target, rate_q=rate_q,
                                               start_keep=previous_keep)
            warning = self.policy.warning(info.n_keep, keys.mask)
        else:
            ratio = 1.0 if keep_ratio is None else float(keep_ratio)
            n_keep = mlm.keep_count_for_ratio(ratio, tokens.size)
            keep, warning = self.policy.select(priority, n_keep, keys.mask)
            rate_q = 0
            stream = self.rate.pack((h, w), tokens, keep, rate_q)
        t4 = time.perf_counter()
        timings["select_and_code"] = t4 - t3
        timings["total"] = t4 - t0
        frame = self.rate.token_frame((h, w), tokens, keep, rate_q)
        return EncodeResult(bitstream=stream, token_frame=frame, tokens=tokens, priority=priority, key_mask=keys.mask,
                            bpp=len(stream) * 8 / (w * h), keep_ratio=float(keep.mean()), target_bytes=target,
                            warning=warning, timings=timings)


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


__all__ = ["EdgeEncoder", "EncodeResult", "EncoderError", "load_bundle", "nearest_codewords",
           "read_image", "validate_frame"]
