"""Per-device scene adaptation in the service: keep calibration stills, adapt in the background, hot-swap.

Layout under `<out_dir>/adaptation/<device>/`:

- `stills/NNNNNNNNNNNN.<ext>`: the calibration stills as received (named by sequence, so in time order);
- `<model id>/`: the device's scene folder for that base model (`mridc.cloud.adapt`: adapter.pt,
  adaptation.json, rejected/), plus `runs.jsonl` (one line per run) and `adapt.log` (the last run's output).

A run is `mridc-cloud adapt` in a child process under `nice` and a CPU-thread limit, with a time budget and a
hard timeout, so it can neither stop nor crash live decoding; it writes the adapter only when it decodes the
newest still (held out) better than the device's current decoder. The service then loads it and swaps the
device's decoder atomically (one dict assignment); frames already being decoded finish with the old one.
Every worker polls the folders, so all workers of a deployment, and a restarted one, use the same version.
Several workers never adapt the same device at once (an exclusive lock file per scene folder).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import machine_key, process_alive

log = logging.getLogger("mridc.cloud.service")

BASE_VERSION = "base"
STILL_SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "avif": ".avif"}


@dataclass
class AdaptationSettings:
    root: Path  # <out_dir>/adaptation
    models_dir: Path | None = None  # the base models (default: $MRIDC_MODELS or the repository's models/)
    run: bool = True  # False: only use adapters on disk (e.g. made by another worker or by hand)
    minutes: float = 15.0  # optimisation budget of one run
    steps: int = 0  # and/or a step budget (0: none)
    threads: int = 1  # CPU threads of a run
    nice: int = 19  # scheduling priority of a run (live decoding runs at 0)
    min_stills: int = 4  # a device's first run starts once it has sent this many stills
    rerun_stills: int = 4  # later runs: once this many new stills have arrived since the last one
    max_stills: int = 20  # stills a run uses (the newest); older ones are deleted beyond twice this
    bpp: str = "0.02,0.03"  # the live budgets the pairs are encoded at
    request_every_s: float = 600.0  # ask a device for stills (in an ack) at most this often while it lacks them
    poll_s: float = 5.0  # how often adapters written by other workers are picked up


class SceneAdapters:
    """The decoder each device is decoded with, and the background adaptation runs that improve it."""

    def __init__(self, base_decoder, settings: AdaptationSettings, metrics=None, *, python: str = sys.executable):
        self.base = base_decoder
        self.settings = settings
        self.metrics = metrics
        self.python = python
        self.root = Path(settings.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_key = f"{int(getattr(base_decoder, 'model_id', 0)):08x}"
        self._decoders: dict[str, Any] = {}  # device -> adapted decoder (absent: the base)
        self._versions: dict[str, str] = {}
        self._running: dict[str, threading.Thread] = {}
        self._asked: dict[str, float] = {}
        self._still_counts: dict[str, int] = {}  # kept by add_still and the poll: no directory listing per frame
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- paths -----------------------------------------------------------------------------------------------
    def device_dir(self, device: str) -> Path:
        return self.root / device

    def stills_dir(self, device: str) -> Path:
        return self.device_dir(device) / "stills"

    def scene_dir(self, device: str) -> Path:
        return self.device_dir(device) / self.model_key

    def devices(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []

    # -- what decoding asks ------------------------------------------------------------------------------------
    def decoder_for(self, device: str):
        return self._decoders.get(device, self.base)

    def version_for(self, device: str) -> str:
        return self._versions.get(device, BASE_VERSION)

    def wants_stills(self, device: str) -> bool:
        """Whether a live frame's ack should ask the device for stills (it has too few to adapt), at most once
        per `request_every_s`."""
        if not self.settings.run or self.still_count(device) >= self.settings.min_stills:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._asked.get(device, -1e18) < self.settings.request_every_s:
                return False
            self._asked[device] = now
        return True

    # -- stills --------------------------------------------------------------------------------------------------
    def stills(self, device: str) -> list[Path]:
        folder = self.stills_dir(device)
        return sorted(p for p in folder.iterdir() if p.suffix in STILL_SUFFIX.values()) if folder.exists() else []

    def still_count(self, device: str) -> int:
        if device not in self._still_counts:
            self._still_counts[device] = len(self.stills(device))
        return self._still_counts[device]

    def add_still(self, device: str, sequence: int, image: bytes, image_format: str) -> bool:
        """Keep one validated still (durably: temporary file, fsync, rename). False if it was kept before."""
        folder = self.stills_dir(device)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sequence:012d}{STILL_SUFFIX[image_format]}"
        if path.exists():
            return False
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        held = self.stills(device)
        for old in held[:-2 * self.settings.max_stills]:
            old.unlink(missing_ok=True)
        self._still_counts[device] = min(len(held), 2 * self.settings.max_stills)
        self.maybe_start(device)
        return True

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load every adapter on disk (a restart keeps them), then poll for new ones and pending runs."""
        self.reload_all()
        self._poller = threading.Thread(target=self._poll_loop, name="mridc-adapt-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.reload_all()
                for device in self.devices():
                    self.maybe_start(device)
            except Exception:  # adaptation must never take the service down
                log.exception("adaptation poll failed")

    def reload_all(self) -> None:
        for device in self.devices():
            self._still_counts.pop(device, None)  # other workers may have added stills
            self.reload(device)

    def reload(self, device: str) -> bool:
        """Load the device's adapter if it changed on disk; swap it in. True when the decoder changed."""
        from mridc.cloud.adapt import ADAPTER_FILE, adapted_decoder, load_adapter

        path = self.scene_dir(device) / ADAPTER_FILE
        if not path.exists():
            return False
        try:
            state, meta = load_adapter(path)
            version = str(meta.get("version", ""))
            if version == self._versions.get(device):
                return False
            decoder = adapted_decoder(self.base, state, meta)
        except Exception:
            log.exception("adapter unusable; keeping the current decoder",
                          extra={"fields": {"device": device, "path": str(path)}})
            return False
        old = self._versions.get(device, BASE_VERSION)
        self._decoders[device] = decoder  # the swap: one assignment, seen whole by the decode thread
        self._versions[device] = version
        if self.metrics is not None:
            self.metrics.adapter_info.labels(device, old).set(0)
            self.metrics.adapter_info.labels(device, version).set(1)
        log.info("adapted decoder in use", extra={"fields": {"device": device, "version": version, "previous": old}})
        return True

    # -- runs -------------------------------------------------------------------------------------------------------
    def last_run(self, device: str) -> dict | None:
        runs = self.scene_dir(device) / "runs.jsonl"
        if not runs.exists():
            return None
        lines = [ln for ln in runs.read_text().splitlines() if ln.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return None

    def maybe_start(self, device: str) -> bool:
        """Start a run for the device if it is due: enough stills, enough new ones since the last run, none
        running here or in another worker."""
        if not self.settings.run or self._stop.is_set():
            return False
        stills = self.stills(device)
        last = self.last_run(device)
        if last is None:
            due = len(stills) >= self.settings.min_stills
        else:
            newest_used = last.get("newest_still", "")
            due = sum(p.name > newest_used for p in stills) >= self.settings.rerun_stills
        if not due:
            return False
        with self._lock:
            if device in self._running:
                return False
            thread = threading.Thread(target=self._run, args=(device, stills), name=f"mridc-adapt-{device}",
                                      daemon=True)
            self._running[device] = thread
        thread.start()
        return True

    def running(self, device: str) -> bool:
        return device in self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait for every run started here to end (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._running.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self._running

    def _lock_path(self, device: str) -> Path:
        return self.scene_dir(device) / ".adapting"

    def _take_lock(self, device: str) -> bool:
        path = self._lock_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    holder = {}
                same_machine = holder.get("machine") == machine_key()  # a PID means the same process only there
                stale = (same_machine and not process_alive(int(holder.get("pid", 0)))) or \
                    time.time() - float(holder.get("since", 0)) > self._timeout_s() + 60
                if not stale:
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"machine": machine_key(), "pid": os.getpid(), "since": time.time()}, fh)
            return True
        return False

    def _timeout_s(self) -> float:
        # the budget, the pairs and loading, with room for a slow machine; beyond it the run is killed
        return self.settings.minutes * 60 * 1.5 + 300

    def _command(self, device: str, stills: list[Path]) -> list[str]:
        cmd = [self.python, "-m", "mridc.cloud.cli", "adapt", *map(str, stills[-self.settings.max_stills:]),
               "--out", str(self.scene_dir(device)), "--minutes", str(self.settings.minutes),
               "--threads", str(self.settings.threads), "--max-frames", str(self.settings.max_stills),
               "--bpp", self.settings.bpp, "--json"]
        if self.settings.steps:
            cmd += ["--steps", str(self.settings.steps)]
        if self.settings.models_dir is not None:
            cmd += ["--models", str(self.settings.models_dir)]
        return cmd

    def _run(self, device: str, stills: list[Path]) -> None:
        record: dict = {"device": device, "started": time.time(), "stills": len(stills),
                        "newest_still": stills[-1].name if stills else ""}
        try:
            if not self._take_lock(device):
                return  # another worker is adapting this device; its result is picked up by the poll
            if self.metrics is not None:
                self.metrics.adaptation_running.inc()
            try:
                record.update(self._run_child(device, stills))
            finally:
                self._lock_path(device).unlink(missing_ok=True)
                if self.metrics is not None:
                    self.metrics.adaptation_running.dec()
            if record["result"] == "accepted":
                self.reload(device)
        except Exception as exc:  # adaptation must never take the service down
            log.exception("adaptation failed", extra={"fields": {"device": device}})
            record.update(result="failed", error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            record["ended"] = time.time()
            if "result" in record:
                if self.metrics is not None:
                    self.metrics.adaptations.labels(record["result"]).inc()
                runs = self.scene_dir(device) / "runs.jsonl"
                runs.parent.mkdir(parents=True, exist_ok=True)
                with open(runs, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                log.info("adaptation run ended", extra={"fields": record})
            with self._lock:
                self._running.pop(device, None)

    def _run_child(self, device: str, stills: list[Path]) -> dict:
        threads = str(self.settings.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        nice = self.settings.nice
        log_path = self.scene_dir(device) / "adapt.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(self._command(device, stills), stdout=subprocess.PIPE, stderr=log_file, env=env)
            if nice:  # set from here: a preexec_fn is unsafe in a process with threads
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
                except OSError:
                    log.warning("could not lower the adaptation run's priority", extra={"fields": {"pid": proc.pid}})
            try:
                out, _ = proc.communicate(timeout=self._timeout_s())
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return {"result": "failed", "error": f"timed out after {self._timeout_s():.0f} s"}
        summary = {}
        for line in out.decode(errors="replace").splitlines():
            try:
                summary = json.loads(line)
            except ValueError:
                continue
        result = {0: "accepted", 3: "rejected"}.get(proc.returncode, "failed")
        info = {"result": result, "returncode": proc.returncode, **{k: summary[k] for k in (
            "version", "held_out_psnr_before", "held_out_psnr_after", "steps", "cpu_seconds", "adapter_bytes")
            if k in summary}}
        if result == "failed":
            info["error"] = log_path.read_text(errors="replace")[-300:]
        return info

    # -- reporting ---------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, dict]:
        """Per device: the version in use, stills held, whether a run is under way, and the last run."""
        return {device: {"version": self.version_for(device), "stills": self.still_count(device),
                         "running": self.running(device), "last_run": self.last_run(device)}
                for device in self.devices()}


def adaptation_state(out_dir: Path) -> dict[str, dict]:
    """What `mridc-cloud frames` shows: each device's adapter on disk and its last run (no models loaded)."""
    root = Path(out_dir) / "adaptation"
    state: dict[str, dict] = {}
    if not root.exists():
        return state
    for device_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        stills = device_dir / "stills"
        entry: dict = {"stills": len([p for p in stills.iterdir() if p.suffix in STILL_SUFFIX.values()])
                       if stills.exists() else 0, "models": {}}
        for scene in sorted(p for p in device_dir.iterdir() if p.is_dir() and p.name != "stills"):
            info_path = scene / "adaptation.json"
            info = {}
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                except ValueError:
                    info = {}
            runs = [ln for ln in (scene / "runs.jsonl").read_text().splitlines() if ln.strip()] \
                if (scene / "runs.jsonl").exists() else []
            entry["models"][scene.name] = {
                "version": info.get("version", BASE_VERSION) if (scene / "adapter.pt").exists() else BASE_VERSION,
                "held_out_psnr": info.get("adapted_psnr"), "adapter_bytes": info.get("bytes"),
                "runs": len(runs), "last_run": json.loads(runs[-1]) if runs else None,
                "running": (scene / ".adapting").exists()}
        state[device_dir.name] = entry
    return state
