"""Encoder runners: the convolutional encoder on one runtime, pixels -> code vectors. No torch here.

A runner takes float32 NCHW pixels in [-1, 1] (batch 1) and returns float32 NCHW code vectors (not unit
length); the nearest-codeword search after it is numpy on every backend (`mridc.edge.quantizer`).

Runners are built by name from a `RunnerRegistry`. The edge registers ONNX Runtime and LiteRT; other
packages add theirs through the ``mridc.edge_runners`` entry-point group (pyproject.toml), which the
registry reads with importlib.metadata when a name is not registered yet. That is how ``--backend torch``
reaches the cloud's reference runner without any edge module importing cloud code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

ENTRY_POINT_GROUP = "mridc.edge_runners"


class EncoderError(RuntimeError):
    """The encoder cannot run (missing bundle, backend unavailable); the message says what to do."""


class EncoderRunner(Protocol):
    """float32 (1, 3, H, W) pixels in [-1, 1] -> float32 (1, D, H / stride, W / stride) code vectors."""

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RunnerConfig:
    """What a runner factory needs: where the bundle is, CPU threads, and the code vector size."""

    models_dir: Path  # the models folder (the edge bundle is its edge/ subfolder)
    threads: int = 1
    code_dim: int = 0  # D, to tell an NHWC output from an NCHW one

    @property
    def edge_dir(self) -> Path:
        return Path(self.models_dir) / "edge"


RunnerFactory = Callable[[RunnerConfig], EncoderRunner]


class OnnxRunner:
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


class LiteRTRunner:
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


def onnx_int8(config: RunnerConfig) -> EncoderRunner:
    return OnnxRunner(config.edge_dir / "encoder_int8.onnx", config.threads)


def onnx_fp32(config: RunnerConfig) -> EncoderRunner:
    return OnnxRunner(config.edge_dir / "encoder_fp32.onnx", config.threads)


def litert_int8(config: RunnerConfig) -> EncoderRunner:
    return LiteRTRunner(config.edge_dir / "encoder_int8.tflite", config.threads, config.code_dim)


class RunnerRegistry:
    """Runner factories by backend name: registered ones, then the ``mridc.edge_runners`` entry points."""

    def __init__(self, factories: dict[str, RunnerFactory] | None = None, entry_point_group: str | None = None):
        self._factories: dict[str, RunnerFactory] = dict(factories or {})
        self.entry_point_group = entry_point_group
        self._found: dict[str, metadata.EntryPoint] | None = None  # entry points, read once

    def register(self, name: str, factory: RunnerFactory) -> RunnerFactory:
        if name in self._factories and self._factories[name] is not factory:
            raise ValueError(f"runner {name!r} is already registered")
        self._factories[name] = factory
        return factory

    def _entry_points(self) -> dict[str, metadata.EntryPoint]:
        if not self.entry_point_group:
            return {}
        if self._found is None:
            # Every distribution's, not `metadata.entry_points()`: that keeps one metadata folder per project
            # name, and a stale mridc.egg-info left by an old build in the source tree shadows the real one.
            self._found = {}
            for dist in metadata.distributions():
                for ep in dist.entry_points:
                    if ep.group == self.entry_point_group:
                        self._found.setdefault(ep.name, ep)
        return self._found

    def names(self) -> tuple[str, ...]:
        """Registered names first (in registration order), then entry points not loaded yet."""
        extra = [n for n in self._entry_points() if n not in self._factories]
        return (*self._factories, *sorted(extra))

    def factory(self, name: str) -> RunnerFactory:
        if name not in self._factories:
            ep = self._entry_points().get(name)
            if ep is None:
                raise EncoderError(f"unknown backend {name!r}; choose one of {', '.join(self.names())}")
            try:
                loaded = ep.load()  # imports the providing package (e.g. the cloud's torch runner)
            except ImportError as exc:
                raise EncoderError(f"backend {name!r} is not installed here ({exc})") from exc
            self.register(name, loaded)
        return self._factories[name]

    def create(self, name: str, config: RunnerConfig) -> EncoderRunner:
        return self.factory(name)(config)


RUNNERS = RunnerRegistry({"onnx": onnx_int8, "onnx-fp32": onnx_fp32, "litert": litert_int8},
                         entry_point_group=ENTRY_POINT_GROUP)
"""The default registry (`EdgeEncoder.from_bundle` uses it): onnx, onnx-fp32, litert, plus entry points."""


__all__ = ["ENTRY_POINT_GROUP", "RUNNERS", "EncoderError", "EncoderRunner", "LiteRTRunner", "OnnxRunner",
           "RunnerConfig", "RunnerFactory", "RunnerRegistry"]
