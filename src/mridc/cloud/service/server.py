"""Process entry points: one worker process (`run_worker`), and a supervisor for `--workers N`.

A worker prints one JSON line `{"event": "ready", ...}` on stdout once it is serving (ports included), so
scripts and tests can wait for it. SIGTERM / SIGINT stop it gracefully: stop taking frames, finish the
queue, disconnect (the MQTT session keeps anything unacked), exit 0.

The supervisor starts N worker processes with worker ids `{worker_id}-{i}`, restarts one that dies (with
backoff) under the same id, so the broker hands it back its unacknowledged messages, and forwards SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from .config import ServiceConfig, config_to_dict, load_config
from .metrics import ServiceMetrics
from .store import FrameStore, WorkerIdInUse
from .worker import DecodeService, FrameDecoder, load_decoder

log = logging.getLogger("mridc.cloud.service")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(config: ServiceConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s %(fields)s",
                                               defaults={"fields": ""}))
    root = logging.getLogger("mridc")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


class Worker:
    """One worker: decode service + the ingest paths the config enables. Usable in-process (tests)."""

    def __init__(self, config: ServiceConfig, decoder: FrameDecoder | None = None):
        self.config = config
        self.decoder = decoder or load_decoder(config.decoder, config.models_dir, config.device, config.backend)
        self.store = FrameStore(config.out_dir)
        self.metrics = ServiceMetrics()
        adapters = None
        if config.adapt:
            from .adaptation import AdaptationSettings, SceneAdapters

            adapters = SceneAdapters(self.decoder, AdaptationSettings(
                root=config.out_dir / "adaptation", models_dir=config.models_dir, run=config.adapt_run,
                minutes=config.adapt_minutes, steps=config.adapt_steps, threads=config.adapt_threads,
                min_stills=config.adapt_min_stills, rerun_stills=config.adapt_rerun_stills,
                max_stills=config.adapt_max_stills, bpp=config.adapt_bpp,
                request_every_s=config.adapt_request_s), self.metrics)
        self.service = DecodeService(config, self.decoder, self.store, self.metrics, adapters=adapters,
                                     instance=f"{config.worker_id}:{os.getpid()}:{time.time_ns()}")
        self.mqtt = None
        self.grpc = None
        self.coap = None
        self.metrics_port: int | None = None

    def start(self) -> dict:
        self.service.start()
        if self.config.metrics_addr:
            self.metrics_port = self.metrics.serve(self.config.metrics_addr)
        if self.config.grpc_addr:
            from .ingest_grpc import GrpcIngest

            self.grpc = GrpcIngest(self.config, self.service)
            self.grpc.start()
        if self.config.coap_addr:
            from .ingest_coap import CoapIngest

            self.coap = CoapIngest(self.config, self.service)
            self.coap.start()
        if self.config.mqtt_url:
            from .ingest_mqtt import MqttIngest

            self.mqtt = MqttIngest(self.config, self.service)
            self.mqtt.start()
            if not self.mqtt.subscribed.wait(15):
                log.warning("mqtt not subscribed after 15 s; still retrying")
        return {"event": "ready", "worker_id": self.config.worker_id, "pid": os.getpid(),
                "grpc_port": self.grpc.port if self.grpc else None, "coap_port": self.coap.port if self.coap else None,
                "metrics_port": self.metrics_port,
                "mqtt_subscribed": bool(self.mqtt and self.mqtt.subscribed.is_set())}

    def stop(self, drain_timeout: float = 30.0) -> None:
        if self.grpc:
            self.grpc.stop(grace=2.0)
        if self.coap:
            self.coap.stop()  # slices still being gathered are the devices' to send again
        if self.mqtt:
            # Stop taking new frames, finish the queue while still connected (so its acks go out). Frames
            # that arrive meanwhile stay unacked in the persistent session for this worker's next start.
            self.mqtt.paused.set()
        self.service.stop(drain_timeout)
        if self.mqtt:
            time.sleep(0.2)  # let the last PUBACKs leave the socket
            self.mqtt.stop()
        self.metrics.close()
        self.store.close()


def run_worker(config: ServiceConfig, decoder: FrameDecoder | None = None) -> int:
    setup_logging(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = Worker(config, decoder)
    try:
        ready = worker.start()
    except WorkerIdInUse as exc:
        log.error("worker id in use", extra={"fields": {"worker_id": config.worker_id, "detail": str(exc)}})
        print(f"mridc-cloud serve: {exc}", file=sys.stderr, flush=True)
        worker.stop(drain_timeout=0)
        return 2
    print(json.dumps(ready), flush=True)
    log.info("worker ready", extra={"fields": ready})
    stop.wait()
    log.info("worker stopping", extra={"fields": {"worker_id": config.worker_id}})
    worker.stop()
    return 0


CONFIG_ENV = "MRIDC_SERVICE_CONFIG_JSON"  # the environment, not argv: argv is world-readable in /proc


def worker_command(config: ServiceConfig, index: int) -> tuple[list[str], str]:
    data = config_to_dict(config)
    data["workers"] = 1
    data["worker_id"] = f"{config.worker_id}-{index}"
    if config.metrics_addr:
        host, _, port = config.metrics_addr.rpartition(":")
        data["metrics_addr"] = f"{host}:{int(port) + index if int(port) else 0}"
    return [sys.executable, "-m", "mridc.cloud.service.server"], json.dumps(data)


def run_supervisor(config: ServiceConfig, *, max_backoff_s: float = 30.0) -> int:
    """Run config.workers worker processes; restart any that dies; stop all on SIGTERM / SIGINT."""
    setup_logging(config)
    if config.grpc_addr and config.grpc_addr.endswith(":0"):
        log.error("--workers > 1 needs a fixed gRPC port (the workers share it with SO_REUSEPORT)")
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs: dict[int, subprocess.Popen] = {}
    restarts: dict[int, int] = {i: 0 for i in range(config.workers)}
    next_start: dict[int, float] = {i: 0.0 for i in range(config.workers)}
    started_at: dict[int, float] = {}
    while not stop.is_set():
        now = time.monotonic()
        for i in range(config.workers):
            proc = procs.get(i)
            if proc is not None and proc.poll() is None:
                if now - started_at[i] > 60:
                    restarts[i] = 0
                continue
            if proc is not None:
                log.warning("worker exited; restarting", extra={"fields": {
                    "worker": i, "returncode": proc.returncode, "restarts": restarts[i]}})
                procs.pop(i)
                next_start[i] = now + min(max_backoff_s, 0.2 * 2 ** restarts[i])
                restarts[i] += 1
            if now >= next_start[i]:
                command, config_json = worker_command(config, i)
                procs[i] = subprocess.Popen(command, env={**os.environ, CONFIG_ENV: config_json})
                started_at[i] = now
                log.info("worker started", extra={"fields": {"worker": i, "pid": procs[i].pid}})
        stop.wait(0.2)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mridc.cloud.service.server")
    parser.add_argument("--config", help="TOML config file")
    args = parser.parse_args(argv)
    # The supervisor hands each worker its whole config as JSON in the environment.
    overrides = json.loads(os.environ.pop(CONFIG_ENV, "{}"))
    config = load_config(args.config, **overrides)
    return run_supervisor(config) if config.workers > 1 else run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
