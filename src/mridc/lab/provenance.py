"""Where a number was measured: machine, package versions, peak memory, and result files that are never half-written.

Every benchmark and the demo record these next to their results; they live here once so the reports agree.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import numpy as np

# The packages whose versions move the numbers (codecs, metrics, the model runtime).
DEFAULT_PACKAGES = ("pillow", "pillow-jxl-plugin", "numpy", "torch", "onnxruntime", "pytorch-msssim", "scipy")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


def machine(*, with_load: bool = False) -> str:
    """One line: architecture, CPU model, cores, RAM, OS, Python (and the load average when it was asked for)."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    load = ""
    if with_load:
        try:
            load = f" (load average {os.getloadavg()[0]:.2f} at start)"
        except OSError:
            pass
    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{load}")


def package_versions(packages=DEFAULT_PACKAGES, *, image_libraries: bool = False) -> dict:
    """Installed version of each package (None when absent); with ``image_libraries``, Pillow's codec libraries."""
    from importlib import metadata

    out: dict = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if image_libraries:
        try:
            from PIL import features

            out["libavif"] = features.version("avif")
            out["libwebp"] = features.version("webp")
            out["libjpeg"] = features.version("jpg")
        except (ImportError, AttributeError):
            pass
    return out


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_rss_mib() -> float:
    """Peak RSS of this process image (VmHWM).

    ``getrusage(RUSAGE_SELF).ru_maxrss`` survives fork + exec on Linux (the kernel keeps the larger of the
    parent's high-water mark and the child's), so in a worker started by a big parent it reports the parent.
    VmHWM belongs to the memory map created at exec, so it is the process's own peak. Falls back to
    ``ru_maxrss`` where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return ru_maxrss_mib()


def json_default(o):
    """numpy scalars as Python numbers; anything else unknown is an error (a result should not hold it)."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json_atomic(path: str | Path, doc, *, indent: int = 1, default=json_default, newline: bool = False,
                      allow_nan: bool = True) -> None:
    """Write ``doc`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or a crash
    mid-run) never sees half a result file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent, default=default, allow_nan=allow_nan) + ("\n" if newline else ""))
    os.replace(tmp, path)
