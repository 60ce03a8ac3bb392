"""Pieces of every trainer: device choice, seeds, RNG state for exact resume, a JSONL loss log, a budget in steps
and/or minutes, the shared command-line options. The loop itself is `mridc.cloud.train.trainer.Trainer`; model
files (best.pt, shipped weights) go through `mridc.cloud.zoo`."""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mridc.cloud.zoo import load_model


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # Checkpoints loaded with map_location may have moved these tensors; RNG states must be CPU bytes.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class JsonlLog:
    """One JSON object per line; `mridc-bench plot-log` reads it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record = {k: (float(v.detach()) if isinstance(v, torch.Tensor)
                      else float(v) if isinstance(v, np.floating) else v)
                  for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class Budget:
    """Stop after `steps` optimizer steps or `minutes` of wall time, whichever first (0 = no limit)."""

    steps: int
    minutes: float = 0.0
    started: float = 0.0
    elapsed_before: float = 0.0  # carried over on resume

    def start(self) -> None:
        self.started = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.started)

    def progress(self, step: int) -> float:
        by_steps = step / self.steps if self.steps else 0.0
        by_time = self.elapsed() / (self.minutes * 60) if self.minutes else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self, step: int) -> bool:
        return (self.steps and step >= self.steps) or (self.minutes and self.elapsed() >= self.minutes * 60)


def add_common_arguments(p: argparse.ArgumentParser, *, kind: str, batch: int, crop: int, lr: float,
                         frozen_tokenizer: bool) -> None:
    """Options every trainer shares (data, run folder, budget, device, init), with per-model defaults."""
    if frozen_tokenizer:
        p.add_argument("--tokenizer", default="models/tokenizer.pt", help="frozen tokenizer weights")
    p.add_argument("--data", nargs="*", help="image folders/files or VIDEO:FIRST-LAST[:EVERY] "
                                             "(default: the ../shared/data training split)")
    p.add_argument("--shared-data", help="reference data folder (default ../shared/data or $MRIDC_DATA)")
    p.add_argument("--out", required=True, help="run folder: last.pt resumes exactly, best.pt is shipped, log.jsonl")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (0 = no step limit)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-time budget; stops at whichever comes first")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--crop", type=int, default=crop, help="training crop side in pixels")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--init", help=f"start from these weights (e.g. models/{kind}.pt) instead of scratch")
    p.add_argument("--tiny", action="store_true", help="tiny model (tests, smoke runs)")


def trainer_main(description: str, add_arguments, train, argv=None) -> int:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    train(p.parse_args(argv))
    return 0


def init_from_shipped(kind: str, path, device: torch.device):
    """A model rebuilt from a shipped weights file (its config included), or None if `path` is unset/missing."""
    if not path or not Path(path).exists():
        return None
    model = load_model(path, kind, device).train()  # a freshly built model trains from train mode too
    print(f"initialised weights from {path}")
    return model
