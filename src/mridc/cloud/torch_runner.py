"""The reference encoder runner: the tokenizer's torch fp32 encoder behind the edge's runner interface.

The edge never imports this module. It is declared in pyproject.toml under the ``mridc.edge_runners``
entry-point group as ``torch``, so ``EdgeEncoder.from_bundle(backend="torch")`` (and
``mridc-edge encode --backend torch``) loads it through `mridc.edge.runners.RUNNERS` where the cloud
extra is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mridc.edge.runners import EncoderError, RunnerConfig


class TorchRunner:
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


def torch_fp32(config: RunnerConfig) -> TorchRunner:
    """The ``torch`` entry point: a `mridc.edge.runners.RunnerFactory`."""
    return TorchRunner(config.models_dir, config.threads)


__all__ = ["TorchRunner", "torch_fp32"]
