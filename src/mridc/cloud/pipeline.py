"""The cloud decode: MRD bytes -> kept tokens -> BPCG token completion -> tokenizer decode -> diffusion refinement.

    decoder = MRIDCDecoder.from_pretrained()          # models/ (or $MRIDC_MODELS)
    image = decoder.decode(stream, realism=0.5, seed=0)   # HxWx3 uint8, the camera frame's size

`fill` chooses how masked tokens are completed:
- "bpcg" (default): one pass of the bidirectional transformer; each masked latent is the blend of the
  predicted code vector (expectation under the predictor's distribution) and the nearest kept token's vector.
  With the shipped, briefly trained predictor this measured best (docs/results/ablation);
- "maskgit": iterative, confidence-ordered MaskGIT decoding with a cosine schedule (hard tokens);
- baselines "nearest" (nearest kept token) and "mode" (most frequent token) for the ablation benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mridc.cloud.diffusion.pipeline import ResidualDiffusionPipeline
from mridc.cloud.maskgit import fill_masked_tokens
from mridc.cloud.zoo import ModelFileError, load_model, tokenizer_codebook
from mridc.shared.bitstream import TokenFrame, decompress
from mridc.shared.entropy import TokenPrior
from mridc.shared.zoo import default_models_dir, model_id_from_codebook

FILLS = ("bpcg", "maskgit", "nearest", "mode")


@dataclass
class DecodeSettings:
    realism: float = 0.5
    seed: int = 0
    steps: int = 8  # diffusion DDIM steps at realism 1 (fewer at lower realism)
    predictor_steps: int = 8
    fill: str = "bpcg"
    blend: float = 0.5  # bpcg: weight of the predicted code vector against the nearest kept token


@dataclass
class DecodeOutput:
    image: np.ndarray  # HxWx3 uint8
    frame: TokenFrame
    completed_tokens: np.ndarray  # (gh, gw) int64
    timings: dict = field(default_factory=dict)


def nearest_kept_fill(tokens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Baseline: each masked token copies the nearest kept token (Euclidean on the grid)."""
    if keep.all() or not keep.any():
        return tokens.copy()
    from scipy.ndimage import distance_transform_edt

    _, (iy, ix) = distance_transform_edt(~keep, return_indices=True)
    return tokens[iy, ix]


def is_scaled(frame: TokenFrame, stride: int) -> bool:
    """A grid smaller than the frame needs means the camera encoded a downscaled frame (docs/bitstream.md)."""
    return frame.grid_h < -(-frame.height // stride) or frame.grid_w < -(-frame.width // stride)


def to_frame_size(pixels: np.ndarray, frame: TokenFrame, stride: int) -> np.ndarray:
    """Decoded grid-sized pixels -> the camera frame's size: crop the padding, or upsample a scaled frame."""
    if not is_scaled(frame, stride):
        return np.ascontiguousarray(pixels[: frame.height, : frame.width])
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((frame.width, frame.height), Image.LANCZOS))


class MRIDCDecoder:
    def __init__(self, tokenizer, predictor=None, diffusion=None, prior: TokenPrior | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.predictor = predictor.to(self.device).eval() if predictor is not None else None
        self.diffusion = ResidualDiffusionPipeline(diffusion.to(self.device).eval()) if diffusion is not None else None
        self.model_id = model_id_from_codebook(tokenizer_codebook(tokenizer))
        self.codebook_size = tokenizer.cfg.codebook_size
        self.stride = tokenizer.cfg.stride
        self.prior = prior or TokenPrior.uniform(self.codebook_size)
        self.mode_token = int(np.argmax(np.asarray(self.prior.freqs)))

    @classmethod
    def from_pretrained(cls, models_dir: str | Path | None = None, device: str = "cpu",
                        with_predictor: bool = True, with_diffusion: bool = True) -> MRIDCDecoder:
        models = Path(models_dir) if models_dir else default_models_dir()
        tokenizer = load_model(models / "tokenizer.pt", "tokenizer", device)
        predictor = load_model(models / "predictor.pt", "predictor", device) if with_predictor else None
        diffusion = load_model(models / "diffusion.pt", "diffusion", device) if with_diffusion else None
        prior_path = models / "edge" / "token_prior.npz"
        if not prior_path.exists():
            raise ModelFileError(f"{prior_path} is missing (run `make export`)")
        return cls(tokenizer, predictor, diffusion, TokenPrior.load(prior_path), device)

    # -- stages -------------------------------------------------------------------------------------
    def validate(self, bitstream: bytes) -> TokenFrame:
        """Parse and check a stream without decoding pixels: CRC, header sanity, model id. BitstreamError if bad."""
        return decompress(bytes(bitstream), self.prior, model_id=self.model_id)

    def complete_latent(self, frames: Sequence[TokenFrame], settings: DecodeSettings
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Same-grid frames -> (code vectors (N,D,gh,gw), trust (N,gh,gw): 1 kept / 0 filled, tokens (N,gh,gw))."""
        grids, keeps = [], []
        for f in frames:
            grid = np.zeros((f.grid_h, f.grid_w), np.int64)
            grid[f.keep_mask] = f.kept_tokens
            grids.append(grid)
            keeps.append(f.keep_mask)
        tokens = torch.from_numpy(np.stack(grids)).to(self.device)
        keep = torch.from_numpy(np.stack(keeps)).to(self.device)
        def nearest() -> torch.Tensor:  # only the fills that use it pay for the distance transform
            return torch.from_numpy(np.stack([nearest_kept_fill(g, k) for g, k in zip(grids, keeps)])).to(self.device)

        lookup = self.tokenizer.quantizer.lookup
        fill = settings.fill
        if fill in ("bpcg", "maskgit") and self.predictor is None:
            fill = "nearest"  # no predictor shipped: the baseline, said so in the decode info
        if fill == "bpcg":
            probs = self.predictor(tokens, keep).float().softmax(-1)
            expected = (probs @ self.tokenizer.quantizer.normalized_codebook()).permute(0, 3, 1, 2)
            blended = settings.blend * expected + (1 - settings.blend) * lookup(nearest())
            latent = torch.where(keep[:, None], lookup(tokens), blended)
            completed = torch.where(keep, tokens, probs.argmax(-1))
        elif fill == "maskgit":
            completed, _ = fill_masked_tokens(self.predictor, tokens, keep, steps=settings.predictor_steps,
                                              seed=settings.seed)
            latent = lookup(completed)
        elif fill == "nearest":
            completed = nearest()
            latent = lookup(completed)
        elif fill == "mode":
            completed = torch.where(keep, tokens, torch.full_like(tokens, self.mode_token))
            latent = lookup(completed)
        else:
            raise ValueError(f"unknown fill {settings.fill!r}; choose one of {FILLS}")
        return latent, keep.float(), completed

    def render(self, latent: torch.Tensor, trust: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
        decoded = self.tokenizer.decoder(latent).clamp(-1, 1)
        if self.diffusion is not None and settings.realism > 0:
            decoded = self.diffusion(decoded, trust, settings.realism, steps=settings.steps, seed=settings.seed)
        return decoded

    # -- public API ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_frames(self, frames: Sequence[TokenFrame], settings: DecodeSettings | None = None) -> list[DecodeOutput]:
        settings = settings or DecodeSettings()
        if settings.fill not in FILLS:
            raise ValueError(f"unknown fill {settings.fill!r}; choose one of {FILLS}")
        outputs: list[DecodeOutput | None] = [None] * len(frames)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault((f.grid_h, f.grid_w), []).append(i)
        for members in groups.values():
            group = [frames[i] for i in members]
            t0 = time.perf_counter()
            latent, trust, tokens = self.complete_latent(group, settings)
            t1 = time.perf_counter()
            images = self.render(latent, trust, settings)
            t2 = time.perf_counter()
            pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(members):
                f = frames[i]
                outputs[i] = DecodeOutput(
                    image=to_frame_size(pixels[j], f, self.stride), frame=f,
                    completed_tokens=tokens[j].cpu().numpy(),
                    timings={"tokens": (t1 - t0) / len(members), "render": (t2 - t1) / len(members)})
        return outputs  # type: ignore[return-value]

    def decode(self, bitstream: bytes, realism: float = 0.5, seed: int = 0, steps: int | None = None,
               fill: str = "bpcg") -> np.ndarray:
        return self.decode_batch([bitstream], realism=realism, seed=seed, steps=steps, fill=fill)[0]

    def decode_batch(self, bitstreams: Sequence[bytes], realism: float = 0.5, seed: int = 0,
                     steps: int | None = None, fill: str = "bpcg") -> list[np.ndarray]:
        settings = DecodeSettings(realism=realism, seed=seed, fill=fill, steps=steps or DecodeSettings.steps)
        frames = [self.validate(b) for b in bitstreams]
        return [o.image for o in self.decode_frames(frames, settings)]
