"""Where shipped model files live and how a model is identified. No torch here (the edge imports it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[3]  # checkout root: src/mridc/shared/zoo.py


def default_models_dir() -> Path:
    """$MRIDC_MODELS if set, else the repository's models/ folder."""
    env = os.environ.get("MRIDC_MODELS")
    return Path(env) if env else REPO_ROOT / "models"


def default_shared_data_dir() -> Path:
    """Reference data beside the checkout (development and CI); $MRIDC_DATA overrides."""
    env = os.environ.get("MRIDC_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def model_id_from_codebook(codebook: np.ndarray) -> int:
    """u32 id: the first 4 bytes (big endian) of SHA-256 over the float32 little-endian codebook.

    The edge and the cloud both compute it from the same shipped numbers, so a stream made with another
    tokenizer is refused instead of decoded into garbage.
    """
    data = np.ascontiguousarray(codebook, dtype="<f4").tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
