"""Load and save the cloud's torch models (weights + config in one file, like diffusers' config.json beside
the weights: a model is rebuilt from its file alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mridc.cloud.diffusion.unet import ConditionalUNet, UNetConfig
from mridc.cloud.predictor import BidirectionalTokenPredictor, PredictorConfig
from mridc.cloud.tokenizer import TokenizerConfig, VQTokenizer
from mridc.shared.zoo import model_id_from_codebook

KINDS = {
    "tokenizer": (TokenizerConfig, VQTokenizer),
    "predictor": (PredictorConfig, BidirectionalTokenPredictor),
    "diffusion": (UNetConfig, ConditionalUNet),
}


class ModelFileError(RuntimeError):
    pass


def save_model(path: Path, kind: str, model: torch.nn.Module, meta: dict | None = None, half: bool = True) -> None:
    from mridc.cloud.train.common import atomic_save, to_half_state_dict

    state = to_half_state_dict(model) if half else model.state_dict()
    atomic_save({"kind": kind, "config": model.cfg.to_dict(), "state_dict": state, "meta": meta or {}}, Path(path))


def load_model(path: Path, kind: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (train it with `make train` or set MRIDC_MODELS)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("kind") != kind:
        raise ModelFileError(f"{path} holds a {blob.get('kind')!r} model, expected {kind!r}")
    cfg_cls, model_cls = KINDS[kind]
    model = model_cls(cfg_cls.from_dict(blob["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    model.meta = blob.get("meta", {})
    return model.to(device).eval()


def tokenizer_codebook(model: VQTokenizer) -> np.ndarray:
    """The L2-normalised codebook exactly as shipped to the edge (float32)."""
    return model.quantizer.normalized_codebook().detach().float().cpu().numpy().astype(np.float32)


def tokenizer_model_id(model: VQTokenizer) -> int:
    return model_id_from_codebook(tokenizer_codebook(model))
