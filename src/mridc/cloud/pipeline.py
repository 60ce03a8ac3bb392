"""The cloud decode, composed from parts the way diffusers composes a pipeline from models and a scheduler:

    TokenFrame (kept tokens + keep mask, parsed from MRD bytes)
      -> fill       completes the masked tokens: a `Fill` (BPCG blend, MaskGIT, nearest, mode)
      -> tokenizer  decodes the completed code vectors to pixels
      -> refiner    conditional diffusion from noise level `realism`: U-Net + scheduler (None: no refinement)
      -> pixels at the camera frame's size

    decoder = MRIDCDecoder.from_models()                           # models/ (or $MRIDC_MODELS)
    outputs = decoder.decode_frames(frames, DecodeSettings(realism=0.5, seed=0))   # parsed TokenFrames
    image = decoder.decode(stream, realism=0.5, seed=0)            # bytes: parse, then decode_frames

Fills (`FILLS`: the names `--fill` and `DecodeSettings.fill` take) share one signature,
`fill(tokens, keep, settings) -> Completion`:
- "bpcg" (default): one pass of the bidirectional transformer; each masked latent is the blend of the
  predicted code vector (expectation under the predictor's distribution) and the nearest kept token's vector.
  With the shipped, briefly trained predictor this measured best (docs/results/ablation);
- "maskgit": iterative, confidence-ordered MaskGIT decoding with a cosine schedule (hard tokens);
- baselines "nearest" (nearest kept token) and "mode" (most frequent token) for the ablation benchmark.
Without a predictor the predictor's fills fall back to "nearest".
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mridc.cloud.diffusion.pipeline import ResidualDiffusionPipeline
from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.maskgit import fill_masked_tokens
from mridc.cloud.predictor import WindowedPredictor
from mridc.cloud.zoo import ModelFileError, load_model, tokenizer_codebook
from mridc.shared import protocol
from mridc.shared.bitstream import TokenFrame, decompress
from mridc.shared.entropy import TokenPrior
from mridc.shared.slices import decompress_slices, is_sliced_file, unpack_slices
from mridc.shared.zoo import default_models_dir, model_id_from_codebook


# -- settings and results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeSettings:
    realism: float = 0.5
    seed: int = 0
    steps: int = 8  # diffusion DDIM steps at realism 1 (fewer at lower realism)
    predictor_steps: int = 8  # maskgit: predictor passes
    fill: str | None = None  # a name in the decoder's fills; None: its default fill ("bpcg" for from_models)
    blend: float = 0.5  # bpcg: weight of the predicted code vector against the nearest kept token


@dataclass
class Completion:
    """A fill's result for a batch of same-size grids."""

    latent: torch.Tensor  # (N,D,gh,gw) code vectors the tokenizer decodes
    trust: torch.Tensor  # (N,gh,gw) 1 kept / 0 filled: the refiner's conditioning
    tokens: torch.Tensor  # (N,gh,gw) int64 hard tokens, the kept ones unaltered


@dataclass
class DecodeOutput:
    image: np.ndarray  # HxWx3 uint8
    frame: TokenFrame
    completed_tokens: np.ndarray  # (gh, gw) int64
    timings: dict = field(default_factory=dict)
    # With decode_frames(keep_intermediate=True): the tokenizer decode (3,H,W in [-1, 1], before the refiner)
    # and the trust map (gh,gw), so `refine_outputs` can refine later without completing and decoding again.
    decoded: torch.Tensor | None = field(default=None, repr=False)
    trust: torch.Tensor | None = field(default=None, repr=False)


# -- fills -------------------------------------------------------------------------------------------------
class Fill(Protocol):
    name: str

    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor, settings: DecodeSettings) -> Completion:
        """(N,gh,gw) int64 tokens (anything at masked positions), (N,gh,gw) bool keep mask -> Completion."""
        ...


def nearest_kept_fill(tokens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Baseline: each masked token copies the nearest kept token (Euclidean on the grid)."""
    if keep.all() or not keep.any():
        return tokens.copy()
    from scipy.ndimage import distance_transform_edt

    _, (iy, ix) = distance_transform_edt(~keep, return_indices=True)
    return tokens[iy, ix]


def nearest_kept_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`nearest_kept_fill` of each grid of a batch."""
    grids = [nearest_kept_fill(t, k) for t, k in zip(tokens.cpu().numpy(), keep.cpu().numpy())]
    return torch.from_numpy(np.stack(grids)).to(tokens.device)


class NearestFill:
    """Each masked token copies the nearest kept token."""

    name = "nearest"
    needs_predictor = False

    def __init__(self, quantizer):
        self.quantizer = quantizer

    @classmethod
    def from_parts(cls, tokenizer, predictor=None, prior: TokenPrior | None = None) -> NearestFill:
        return cls(tokenizer.quantizer)

    def __call__(self, tokens, keep, settings):
        completed = nearest_kept_tokens(tokens, keep)
        return Completion(self.quantizer.lookup(completed), keep.float(), completed)


class ModeFill:
    """Each masked token is the most frequent token of the prior."""

    name = "mode"
    needs_predictor = False

    def __init__(self, quantizer, mode_token: int):
        self.quantizer = quantizer
        self.mode_token = int(mode_token)

    @classmethod
    def from_parts(cls, tokenizer, predictor=None, prior: TokenPrior | None = None) -> ModeFill:
        return cls(tokenizer.quantizer, mode_token_of(prior or TokenPrior.uniform(tokenizer.cfg.codebook_size)))

    def __call__(self, tokens, keep, settings):
        completed = torch.where(keep, tokens, torch.full_like(tokens, self.mode_token))
        return Completion(self.quantizer.lookup(completed), keep.float(), completed)


class BlendFill:
    """BPCG: one predictor pass; masked latents blend the expected code vector with the nearest kept one."""

    name = "bpcg"
    needs_predictor = True

    def __init__(self, predictor, quantizer):
        self.predictor = predictor
        self.quantizer = quantizer

    @classmethod
    def from_parts(cls, tokenizer, predictor=None, prior: TokenPrior | None = None) -> BlendFill:
        return cls(predictor, tokenizer.quantizer)

    def __call__(self, tokens, keep, settings):
        lookup = self.quantizer.lookup
        probs = self.predictor(tokens, keep).float().softmax(-1)
        expected = (probs @ self.quantizer.normalized_codebook()).permute(0, 3, 1, 2)
        blended = settings.blend * expected + (1 - settings.blend) * lookup(nearest_kept_tokens(tokens, keep))
        latent = torch.where(keep[:, None], lookup(tokens), blended)
        return Completion(latent, keep.float(), torch.where(keep, tokens, probs.argmax(-1)))


class MaskGITFill:
    """Iterative MaskGIT decoding (`settings.predictor_steps` passes, seeded); hard tokens."""

    name = "maskgit"
    needs_predictor = True

    def __init__(self, predictor, quantizer):
        self.predictor = predictor
        self.quantizer = quantizer

    @classmethod
    def from_parts(cls, tokenizer, predictor=None, prior: TokenPrior | None = None) -> MaskGITFill:
        return cls(predictor, tokenizer.quantizer)

    def __call__(self, tokens, keep, settings):
        completed, _ = fill_masked_tokens(self.predictor, tokens, keep, steps=settings.predictor_steps,
                                          seed=settings.seed)
        return Completion(self.quantizer.lookup(completed), keep.float(), completed)


FILL_TYPES: dict[str, type] = {cls.name: cls for cls in (BlendFill, MaskGITFill, NearestFill, ModeFill)}
FILLS = tuple(FILL_TYPES)  # ("bpcg", "maskgit", "nearest", "mode"); the first is the default


def make_fill(name: str, tokenizer, predictor=None, prior: TokenPrior | None = None) -> Fill:
    """The registered fill `name` over these parts; a predictor fill without a predictor is the nearest fill."""
    if name not in FILL_TYPES:
        raise ValueError(f"unknown fill {name!r}; choose one of {FILLS}")
    cls = FILL_TYPES[name]
    if cls.needs_predictor and predictor is None:
        cls = NearestFill
    return cls.from_parts(tokenizer, predictor, prior)


def make_fills(tokenizer, predictor=None, prior: TokenPrior | None = None) -> dict[str, Fill]:
    return {name: make_fill(name, tokenizer, predictor, prior) for name in FILLS}


def mode_token_of(prior: TokenPrior) -> int:
    return int(np.argmax(np.asarray(prior.freqs)))


# -- refiner -----------------------------------------------------------------------------------------------
class Refiner(Protocol):
    """E.g. `ResidualDiffusionPipeline(unet, scheduler)`: swap the scheduler, keep the model."""

    def __call__(self, decoded: torch.Tensor, trust: torch.Tensor, realism: float, steps: int = 8,
                 seed: int = 0) -> torch.Tensor:
        """(N,3,H,W) decode in [-1, 1] + (N,gh,gw) trust -> refined (N,3,H,W); realism 0 returns `decoded`."""
        ...


# -- frame geometry ----------------------------------------------------------------------------------------
def is_scaled(frame: TokenFrame, stride: int) -> bool:
    """The grid covers a resized frame: a smaller grid than the frame needs (implicit v1 rule), or a stream that
    says so (FLAG_RESAMPLED: a finer grid). docs/bitstream.md."""
    return protocol.is_scaled(frame.width, frame.height, frame.grid_h, frame.grid_w, stride, frame.resampled)


def to_frame_size(pixels: np.ndarray, frame: TokenFrame, stride: int) -> np.ndarray:
    """Decoded grid-sized pixels -> the camera frame's size: crop the padding, or upsample a scaled frame."""
    if not is_scaled(frame, stride):
        return np.ascontiguousarray(pixels[: frame.height, : frame.width])
    return protocol.resize_to_frame(pixels, frame.width, frame.height)


# -- the decoder -------------------------------------------------------------------------------------------
# A 3837x2560 (9.8 MP) frame peaked at 7.2 GB RSS at realism 0 on the CPU with the windowed predictor
# (docs/results/large_frames): ~0.73 KB a pixel, so 16 MP stays near 12 GB. The format allows 16384x16384;
# a frame over the limit is refused, not attempted.
DEFAULT_MAX_FRAME_PIXELS = 16 * 1024 * 1024


class FrameTooLarge(ValueError):
    """A well-formed stream whose frame is larger than this decoder decodes (`max_frame_pixels`)."""


class MRIDCDecoder:
    """tokenizer + fill(s) + refiner + token prior.

    `fill`: one Fill (the only and default one) or {name: Fill} (the first is the default; default: every
    registered fill, without a predictor). `refiner`: None decodes at realism 0 whatever the settings say.
    The fills and the refiner are expected on `device` already; the tokenizer is moved there.
    """

    def __init__(self, tokenizer, fill: Fill | Mapping[str, Fill] | None = None, refiner: Refiner | None = None,
                 prior: TokenPrior | None = None, device: str | torch.device = "cpu",
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS):
        self.device = torch.device(device)
        self.max_frame_pixels = int(max_frame_pixels)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.prior = prior or TokenPrior.uniform(tokenizer.cfg.codebook_size)
        if fill is None:
            fill = make_fills(self.tokenizer, None, self.prior)
        self.fills: dict[str, Fill] = dict(fill) if isinstance(fill, Mapping) else {fill.name: fill}
        if not self.fills:
            raise ValueError("a decoder needs at least one fill")
        self.default_fill = next(iter(self.fills))
        self.refiner = refiner
        self.latent_decoder = self.tokenizer.decoder  # code vectors -> pixels; `accelerate` may swap it
        self.backend = "torch"
        self.model_id = model_id_from_codebook(tokenizer_codebook(tokenizer))
        self.codebook_size = tokenizer.cfg.codebook_size
        self.stride = tokenizer.cfg.stride
        self.mode_token = mode_token_of(self.prior)
        self.adapter_version = ""  # "" = the base decoder; else the scene adapter's version (mridc.cloud.adapt)

    @classmethod
    def from_models(cls, models_dir: str | Path | None = None, device: str = "cpu", with_predictor: bool = True,
                    with_diffusion: bool = True, scheduler: DDIMScheduler | None = None,
                    backend: str = "torch") -> MRIDCDecoder:
        """The shipped decoder from a models folder (default models/ or $MRIDC_MODELS); `scheduler` swaps DDIM's.

        `backend`: "torch", "onnxruntime" (the tokenizer decoder and the U-Net through ONNX Runtime, about 2x
        faster on a CPU; outputs differ by float rounding) or "auto" (ONNX Runtime on a CPU when installed)."""
        models = Path(models_dir) if models_dir else default_models_dir()
        tokenizer = load_model(models / "tokenizer.pt", "tokenizer", device)
        predictor = None
        if with_predictor:  # windowed: a large frame's attention must not grow with the square of its tokens
            predictor = WindowedPredictor(load_model(models / "predictor.pt", "predictor", device))
        refiner = None
        if with_diffusion:
            refiner = ResidualDiffusionPipeline(load_model(models / "diffusion.pt", "diffusion", device), scheduler)
        prior_path = models / "edge" / "token_prior.npz"
        if not prior_path.exists():
            raise ModelFileError(f"{prior_path} is missing (run `make export`)")
        prior = TokenPrior.load(prior_path)
        decoder = cls(tokenizer, make_fills(tokenizer, predictor, prior), refiner, prior, device)
        return decoder.accelerate(backend)

    def accelerate(self, backend: str = "onnxruntime", **options) -> MRIDCDecoder:
        """Run the tokenizer decoder and the refiner's U-Net with `backend` (see `from_models`); returns self."""
        from mridc.cloud.accel import accelerate_latent_decoder, accelerate_predictor, accelerate_unet, resolve_backend

        backend = resolve_backend(backend, self.device)
        if backend == "onnxruntime" and self.backend != backend:
            self.latent_decoder = accelerate_latent_decoder(self.tokenizer.decoder, self.tokenizer.cfg.code_dim,
                                                            **options)
            if self.refiner is not None and hasattr(self.refiner, "unet"):
                self.refiner.unet = accelerate_unet(self.refiner.unet, **options)
            if self.predictor is not None:
                accelerate_predictor(self.predictor, **options)
            self.backend = backend
        return self


    @property
    def predictor(self):
        """The token predictor behind the fills (None without one), for benchmarks that score it directly."""
        return next((f.predictor for f in self.fills.values() if getattr(f, "predictor", None) is not None), None)

    # -- stages -------------------------------------------------------------------------------------
    def validate(self, bitstream: bytes) -> TokenFrame:
        """Parse and check a stream without decoding pixels: CRC, header sanity, model id, frame size.

        A sliced frame (`pack_slices` container, as the datagram ingest assembles it) gives its rebuilt frame:
        the rows of missing or bad slices are masked, for the token completion to fill.
        BitstreamError if malformed, FrameTooLarge if over `max_frame_pixels` (both are ValueErrors)."""
        data = bytes(bitstream)
        if is_sliced_file(data):
            frame = decompress_slices(unpack_slices(data), self.prior, model_id=self.model_id).frame
        else:
            frame = decompress(data, self.prior, model_id=self.model_id)
        self.check_size(frame)
        return frame

    def check_size(self, frame: TokenFrame) -> None:
        pixels = frame.width * frame.height
        if pixels > self.max_frame_pixels:
            raise FrameTooLarge(f"frame {frame.width}x{frame.height} ({pixels / 1e6:.1f} MP) is larger than this "
                                f"decoder's limit of {self.max_frame_pixels / 1e6:.1f} MP (max_frame_pixels)")

    def fill_for(self, settings: DecodeSettings) -> Fill:
        name = settings.fill or self.default_fill
        if name not in self.fills:
            raise ValueError(f"unknown fill {name!r}; choose one of {tuple(self.fills)}")
        return self.fills[name]

    @torch.no_grad()
    def complete(self, frames: Sequence[TokenFrame], settings: DecodeSettings) -> Completion:
        """Same-grid frames -> their completed latents, trust maps and tokens (the settings' fill)."""
        fill = self.fill_for(settings)
        grids = np.zeros((len(frames), frames[0].grid_h, frames[0].grid_w), np.int64)
        for grid, f in zip(grids, frames):
            grid[f.keep_mask] = f.kept_tokens
        tokens = torch.from_numpy(grids).to(self.device)
        keep = torch.from_numpy(np.stack([f.keep_mask for f in frames])).to(self.device)
        return fill(tokens, keep, settings)

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Code vectors -> the tokenizer's decode, (N,3,H,W) in [-1, 1] (what realism 0 shows)."""
        return self.latent_decoder(latent).to(latent.device).clamp(-1, 1)

    def refine(self, decoded: torch.Tensor, trust: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
        if self.refiner is None or settings.realism <= 0:
            return decoded
        return self.refiner(decoded, trust, settings.realism, steps=settings.steps, seed=settings.seed)

    def to_images(self, images: torch.Tensor, frames: Sequence[TokenFrame]) -> list[np.ndarray]:
        """(N,3,H,W) in [-1, 1] -> HxWx3 uint8 at each camera frame's size."""
        pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return [to_frame_size(p, f, self.stride) for p, f in zip(pixels, frames)]

    # -- public API ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_frames(self, frames: Sequence[TokenFrame], settings: DecodeSettings | None = None,
                      keep_intermediate: bool = False) -> list[DecodeOutput]:
        """Parsed frames -> one DecodeOutput each, in order; frames of one grid size are decoded as a batch.

        `keep_intermediate`: each output keeps its tokenizer decode and trust map (for `refine_outputs`)."""
        settings = settings or DecodeSettings()
        self.fill_for(settings)  # an unknown fill fails before any work
        for f in frames:  # frames parsed elsewhere skipped `validate`: refuse an oversized one before any work
            self.check_size(f)
        outputs: list[DecodeOutput | None] = [None] * len(frames)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault((f.grid_h, f.grid_w), []).append(i)
        for members in groups.values():
            group = [frames[i] for i in members]
            t0 = time.perf_counter()
            completion = self.complete(group, settings)
            t1 = time.perf_counter()
            decoded = self.decode_latent(completion.latent)
            images = self.to_images(self.refine(decoded, completion.trust, settings), group)
            t2 = time.perf_counter()
            for j, i in enumerate(members):
                outputs[i] = DecodeOutput(
                    image=images[j], frame=frames[i], completed_tokens=completion.tokens[j].cpu().numpy(),
                    timings={"tokens": (t1 - t0) / len(members), "render": (t2 - t1) / len(members)},
                    decoded=decoded[j].clone() if keep_intermediate else None,
                    trust=completion.trust[j].clone() if keep_intermediate else None)
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def refine_outputs(self, outputs: Sequence[DecodeOutput], settings: DecodeSettings) -> list[DecodeOutput]:
        """Refine earlier decodes (made with keep_intermediate=True) at `settings`: only the refiner runs.

        The pictures equal `decode_frames(frames, settings)` when the fill is deterministic (bpcg, nearest,
        mode): completion and the tokenizer decode do not depend on the realism."""
        if any(o.decoded is None or o.trust is None for o in outputs):
            raise ValueError("refine_outputs needs outputs decoded with keep_intermediate=True")
        results: list[DecodeOutput | None] = [None] * len(outputs)
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(outputs):
            groups.setdefault(tuple(o.decoded.shape), []).append(i)
        for members in groups.values():
            t0 = time.perf_counter()
            decoded = torch.stack([outputs[i].decoded for i in members]).to(self.device)
            trust = torch.stack([outputs[i].trust for i in members]).to(self.device)
            frames = [outputs[i].frame for i in members]
            images = self.to_images(self.refine(decoded, trust, settings), frames)
            t1 = time.perf_counter()
            for j, i in enumerate(members):
                o = outputs[i]
                results[i] = DecodeOutput(image=images[j], frame=o.frame, completed_tokens=o.completed_tokens,
                                          timings={"refine": (t1 - t0) / len(members)})
        return results  # type: ignore[return-value]

    def decode(self, bitstream: bytes, realism: float = 0.5, seed: int = 0, steps: int | None = None,
               fill: str | None = None) -> np.ndarray:
        return self.decode_batch([bitstream], realism=realism, seed=seed, steps=steps, fill=fill)[0]

    def decode_batch(self, bitstreams: Sequence[bytes], realism: float = 0.5, seed: int = 0,
                     steps: int | None = None, fill: str | None = None) -> list[np.ndarray]:
        """MRD bytes -> images: a thin wrapper that parses, then `decode_frames`."""
        settings = DecodeSettings(realism=realism, seed=seed, fill=fill, steps=steps or DecodeSettings.steps)
        frames = [self.validate(b) for b in bitstreams]
        return [o.image for o in self.decode_frames(frames, settings)]
