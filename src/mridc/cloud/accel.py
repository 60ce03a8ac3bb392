"""Run the cloud decoder's convolutional networks through ONNX Runtime on the CPU.

On this project's 2-core CPU, ONNX Runtime runs the tokenizer's decoder about 2x faster than PyTorch eager
(`mridc-bench refine` measures it, with the quality change). A module is exported once, with its spatial
sizes dynamic, to a cache file keyed by a hash of its weights, class and input signature, so later loads
take milliseconds and a retrained model never meets a stale export. Outputs differ from PyTorch's by float
rounding only (about 1e-4 in [-1, 1]), a pixel by at most one level in a few places.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("mridc.cloud.accel")

BACKENDS = ("torch", "onnxruntime", "auto")
ONNX_OPSET = 17


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """"auto": ONNX Runtime on the CPU when it is installed, PyTorch otherwise (and always on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"decoder backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def default_cache_dir() -> Path:
    env = os.environ.get("MRIDC_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mridc"
    return base / "onnx"


def module_digest(module: torch.nn.Module, signature: str) -> str:
    """Weights + class + input signature + torch version: the identity of an export."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{signature}|{torch.__version__}"
                       .encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class OrtModule:
    """Calls `module(*inputs)` through an ONNX Runtime session: tensors in, one float tensor out.

    With `dynamic` (input index -> its dynamic axes; the output's axes 0, 2 and 3 are dynamic too), one export
    from `example_inputs` serves every size. Without it (modules whose export bakes sizes in, such as
    attention), each input shape gets its own export and session, made on first use and cached; a camera's
    frames all have one shape. Attributes not found here (e.g. `cfg`) come from `module`, so the wrapper
    stands in wherever the module's forward is all that is used.
    """

    def __init__(self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                 dynamic: dict[int, Sequence[int]] | None = None, *, threads: int | None = None,
                 cache_dir: str | Path | None = None, name: str = "module", max_sessions: int = 8):
        self.module = module.eval()
        self.name = name
        self.dynamic = dynamic
        self.threads = threads or torch.get_num_threads()
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_sessions = max_sessions
        self._sessions: dict[tuple, object] = {}
        self._weights = module_digest(module, "")
        self._lock = threading.Lock()  # one run at a time: keeps the thread count as configured
        if dynamic is not None:
            if example_inputs is None:
                raise ValueError("a dynamic export needs example inputs")
            self._sessions[()] = self._session(list(example_inputs), ())

    def _session(self, inputs: list[torch.Tensor], shape_key: tuple):
        import onnxruntime as ort

        names = [f"in{i}" for i in range(len(inputs))]
        signature = ";".join(f"{t.dtype}:{t.dim()}" for t in inputs) + f"|{shape_key}"
        digest = hashlib.sha256(f"{self._weights}|{signature}|{torch.__version__}".encode()).hexdigest()[:24]
        path = self.cache / f"{self.name}-{digest}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            axes = None
            if self.dynamic is not None:
                axes = {names[i]: {a: f"{names[i]}_d{a}" for a in dims} for i, dims in self.dynamic.items()}
                axes["out"] = {0: "n", 2: "h", 3: "w"}
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
            try:
                with torch.no_grad():
                    torch.onnx.export(self.module, tuple(inputs), buffer, input_names=names, output_names=["out"],
                                      dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, path)  # several workers may export at once: one file wins, all are the same
            log.info("exported %s to %s", self.name, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), names

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = () if self.dynamic is not None else tuple(tuple(t.shape) for t in inputs)
        with self._lock:
            entry = self._sessions.get(key)
            if entry is None:
                if len(self._sessions) >= self.max_sessions:
                    self._sessions.pop(next(iter(self._sessions)))  # the oldest shape goes
                entry = self._sessions[key] = self._session([t.detach().cpu() for t in inputs], key)
            session, names = entry
            feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, inputs)}
            (out,) = session.run(None, feed)
        return torch.from_numpy(out)

    def __getattr__(self, item):
        # Only reached for attributes not set in __init__: the wrapped module's (cfg, ...).
        if item == "module":
            raise AttributeError(item)
        return getattr(self.module, item)


def accelerate_latent_decoder(decoder: torch.nn.Module, code_dim: int, **options) -> OrtModule:
    example = torch.zeros(1, code_dim, 4, 6)
    return OrtModule(decoder, [example], {0: (0, 2, 3)}, name="tokenizer-decoder", **options)


class _PredictorCore(torch.nn.Module):
    def __init__(self, predictor: torch.nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.transform(x)


def accelerate_predictor(predictor: torch.nn.Module, **options) -> None:
    """Run a BidirectionalTokenPredictor's transformer through ONNX Runtime (one export per grid shape)."""
    inner = getattr(predictor, "predictor", predictor)  # a WindowedPredictor wraps the real one
    if not hasattr(inner, "core_runner"):
        return
    inner.core_runner = OrtModule(_PredictorCore(inner), name="predictor", **options)


def accelerate_unet(unet: torch.nn.Module, **options) -> OrtModule:
    size = 2 * unet.multiple
    x = torch.zeros(1, 3, size, size)
    t = torch.zeros(1, dtype=torch.long)
    cond = torch.zeros(1, unet.cfg.cond_channels, size, size)
    return OrtModule(unet, [x, t, cond], {0: (0, 2, 3), 1: (0,), 2: (0, 2, 3)}, name="diffusion-unet", **options)
