"""The one checkpoint format of the cloud's torch models, and the only code that reads or writes it.

A model file holds `{"kind", "config", "state_dict", "meta"}`: weights and config in one file (like
diffusers' config.json beside the weights), so a model is rebuilt from its file alone. Shipped files
(models/*.pt) store floating weights in fp16 except the codebook; run files (runs/*/best.pt) store fp32.
Both load through `load_checkpoint`, which turns the weights back into fp32. The discriminator's files have
no config (its trainer knows its width). Training resume state (runs/*/last.pt) is the trainers' own format.

Inference code imports this module, never `mridc.cloud.train`.
"""

from __future__ import annotations

import os
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


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file then rename, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def half_state_dict(state: dict) -> dict:
    """Weights for shipping: floating tensors in fp16 (half the size; the decoder computes in fp32).

    The codebook stays fp32: the model id is a hash of it and the edge searches it.
    """
    return {k: (v.half() if v.is_floating_point() and "codebook" not in k else v) for k, v in state.items()}


def save_checkpoint(path: Path, kind: str, state_dict: dict, *, config: dict | None = None,
                    meta: dict | None = None, half: bool = False) -> None:
    """Write a model file (atomically); `half` for shipping files."""
    blob = {"kind": kind}
    if config is not None:
        blob["config"] = config
    blob["state_dict"] = half_state_dict(state_dict) if half else state_dict
    blob["meta"] = meta or {}
    atomic_save(blob, Path(path))


def save_model(path: Path, kind: str, model: torch.nn.Module, meta: dict | None = None, half: bool = True) -> None:
    """A model's weights and config (shipping precision by default)."""
    save_checkpoint(path, kind, model.state_dict(), config=model.cfg.to_dict(), meta=meta, half=half)


def load_checkpoint(path: Path, kind: str, device: str | torch.device = "cpu") -> dict:
    """A model file's dict, its kind checked and its floating weights in fp32."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (train it with `make train` or set MRIDC_MODELS)")
    blob = torch.load(path, map_location=device, weights_only=False)
    if blob.get("kind") != kind:
        raise ModelFileError(f"{path} holds a {blob.get('kind')!r} model, expected {kind!r}")
    blob["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    blob.setdefault("meta", {})
    return blob


def load_model(path: Path, kind: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model rebuilt from its file, in eval mode, on `device`; its file's meta as `model.meta`."""
    blob = load_checkpoint(path, kind)
    cfg_cls, model_cls = KINDS[kind]
    model = model_cls(cfg_cls.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    model.meta = blob["meta"]
    return model.to(device).eval()


def tokenizer_codebook(model: VQTokenizer) -> np.ndarray:
    """The L2-normalised codebook exactly as shipped to the edge (float32)."""
    return model.quantizer.normalized_codebook().detach().float().cpu().numpy().astype(np.float32)


def tokenizer_model_id(model: VQTokenizer) -> int:
    return model_id_from_codebook(tokenizer_codebook(model))
