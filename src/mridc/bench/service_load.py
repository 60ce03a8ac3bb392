"""Load benchmark for the cloud service: M simulated devices publishing through a real mosquitto to 1..N
real worker processes (`mridc-cloud serve --workers N`).

Each device sends one frame every `interval_s` seconds (random phase) for `duration_s`. The benchmark
records, once a second: frames sent and acknowledged, the backlog (sent, not yet acked: it sits in the
broker and the workers' bounded queues), the service's CPU (all its processes, from /proc) and memory (RSS),
and the workers' decode-queue depth (from their Prometheus endpoints). Modes:

- `transport`: the token-paint test decoder (a real MRD parse, no network): the ingest ceiling.
- `cheap`: MRIDCDecoder with realism 0 (tokenizer decode of the predicted tokens).
- `full`: MRIDCDecoder with realism 1 (BPCG + diffusion).

The devices run as threads in the benchmark process, on the same machine as the service, so on a small
machine they take CPU from the workers; the JSON records the machine's CPU count.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.shared.protocol import acks_topic, build_envelope, frames_topic
from mridc.v1 import mridc_pb2

MODES = {
    "transport": {"decoder": "mridc.lab.synthetic:make_token_paint_decoder", "realism": 0.0},
    "cheap": {"decoder": "mridc", "realism": 0.0},
    "full": {"decoder": "mridc", "realism": 1.0},
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- streams --------------------------------------------------------------------------------------------------
def transport_streams(count: int = 16) -> list[bytes]:
    from mridc.lab.synthetic import synthetic_stream

    return [synthetic_stream(f"bench/{i}") for i in range(count)]


def real_streams(count: int = 8, bpp: float = 0.02, models_dir=None) -> list[bytes]:
    """MRD streams from the edge encoder on the eval photos (what a camera would send)."""
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab.datasets import photos_eval

    encoder = EdgeEncoder.from_bundle(models_dir=models_dir)
    images = photos_eval()[:count]
    if not images:
        raise RuntimeError("no eval photos found for the benchmark streams")
    return [encoder.encode(item.rgb if hasattr(item, "rgb") else item.image, bpp=bpp).bitstream for item in images]


def stream_model_id(stream: bytes) -> int:
    from mridc.shared.bitstream import inspect

    return int(inspect(stream)["model_id"])


# -- process statistics -----------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def cpu_seconds_and_rss(pids: list[int]) -> tuple[float, float]:
    cpu, rss = 0.0, 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12])) / _CLK_TCK
            rss += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss / 2**20


def queue_depth(metrics_ports: list[int]) -> float:
    total = 0.0
    for port in metrics_ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("mridc_decode_queue_depth "):
                total += float(line.split()[1])
    return total


# -- simulated fleet --------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    port: int
    devices: int
    streams: list[bytes]
    model_id: int
    sent: dict = field(default_factory=dict)  # (device, seq) -> send time
    acked: dict = field(default_factory=dict)  # (device, seq) -> (ack time, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self) -> None:
        import paho.mqtt.client as mqtt

        self.clients = []
        ready = threading.Semaphore(0)
        for i in range(self.devices):
            device = f"dev-{i:04d}"
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)

            def on_connect(c, u, f, rc, p, device=device):
                c.subscribe(acks_topic(device), qos=1)

            client.on_connect = on_connect
            client.on_subscribe = lambda *a: ready.release()
            client.on_message = self._on_ack
            client.connect("127.0.0.1", self.port, keepalive=60)
            client.loop_start()
            self.clients.append((device, client))
        deadline = time.monotonic() + 30 + self.devices * 0.2
        for subscribed in range(self.devices):
            if not ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"only {subscribed}/{self.devices} simulated devices subscribed")

    def _on_ack(self, client, userdata, message) -> None:
        ack = mridc_pb2.FrameAck()
        ack.ParseFromString(message.payload)
        with self.lock:
            self.acked.setdefault((ack.device_id, ack.sequence), (time.monotonic(), ack.status))

    def send(self, index: int, sequence: int) -> None:
        device, client = self.clients[index]
        stream = self.streams[(index + sequence) % len(self.streams)]
        envelope = build_envelope(device, sequence, stream, self.model_id)
        with self.lock:
            self.sent[(device, sequence)] = time.monotonic()
        client.publish(frames_topic(device), envelope.SerializeToString(), qos=1)

    def run(self, interval_s: float, duration_s: float, seed: int = 0) -> None:
        rng = random.Random(seed)
        start = time.monotonic()
        schedule = [(start + rng.uniform(0, interval_s), i, 1) for i in range(self.devices)]
        heapq.heapify(schedule)
        while schedule:
            when, index, sequence = heapq.heappop(schedule)
            if when - start > duration_s:
                break
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send(index, sequence)
            heapq.heappush(schedule, (when + interval_s, index, sequence + 1))

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.sent), len(self.acked)

    def close(self) -> None:
        for _device, client in self.clients:
            client.disconnect()
            client.loop_stop()


# -- one run ----------------------------------------------------------------------------------------------------
def start_service(broker_url: str, out: Path, workers: int, mode: dict, *, queue_size: int, batch_size: int,
                  metrics_port: int, models_dir=None, device: str = "cpu",
                  log_path: Path) -> tuple[subprocess.Popen, list[dict]]:
    args = [sys.executable, "-m", "mridc.cloud.service.cli", "serve", "--mqtt", broker_url, "--out", str(out),
            "--workers", str(workers), "--worker-id", "bench", "--decoder", mode["decoder"], "--refine-realism", "0",
            "--realism",
            str(mode["realism"]), "--queue-size", str(queue_size), "--batch-size", str(batch_size),
            "--rate-limit", "0", "--metrics", f"127.0.0.1:{metrics_port}", "--device", device]
    if models_dir:
        args += ["--models", str(models_dir)]
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
    readies: list[dict] = []
    deadline = time.monotonic() + 180
    while len(readies) < workers:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"service did not start; see {log_path}")
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if data.get("event") == "ready":
            readies.append(data)
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
    return proc, readies


def run_once(out_dir: Path, *, mode_name: str, workers: int, devices: int, interval_s: float, duration_s: float,
             streams: list[bytes], queue_size: int, batch_size: int, drain_timeout_s: float, models_dir=None,
             device: str = "cpu", seed: int = 0) -> dict:
    from mridc.cloud.service.store import FrameStore
    from mridc.lab.broker import MosquittoBroker, free_port

    run_dir = out_dir / f"{mode_name}-w{workers}"
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = MODES[mode_name]
    timeline = []
    with MosquittoBroker() as broker:
        proc, readies = start_service(broker.url, run_dir / "store", workers, mode, queue_size=queue_size,
                                      batch_size=batch_size, metrics_port=free_port(), models_dir=models_dir,
                                      device=device, log_path=run_dir / "service.log")
        metrics_ports = [r["metrics_port"] for r in readies]
        fleet = Fleet(broker.port, devices, streams, stream_model_id(streams[0]))
        try:
            fleet.connect()
            sender = threading.Thread(target=fleet.run, args=(interval_s, duration_s, seed), daemon=True)
            start = time.monotonic()
            cpu0, _ = cpu_seconds_and_rss(process_tree(proc.pid))
            last_t, last_cpu = start, cpu0
            sender.start()
            while True:
                time.sleep(1.0)
                now = time.monotonic()
                cpu, rss = cpu_seconds_and_rss(process_tree(proc.pid))
                sent, acked = fleet.counts()
                timeline.append({"t": round(now - start, 2), "sent": sent, "acked": acked, "backlog": sent - acked,
                                 "cpu_percent": round(100 * (cpu - last_cpu) / (now - last_t), 1),
                                 "rss_mib": round(rss, 1), "queue_depth": queue_depth(metrics_ports)})
                last_t, last_cpu = now, cpu
                if not sender.is_alive() and (acked >= sent or now - start > duration_s + drain_timeout_s):
                    break
        finally:
            fleet.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    store = FrameStore(run_dir / "store")
    rows = store.query()
    store.close()
    sent, acked = len(fleet.sent), len(fleet.acked)
    latencies = np.array([fleet.acked[k][0] - fleet.sent[k] for k in fleet.acked if k in fleet.sent])
    ack_times = sorted(v[0] for v in fleet.acked.values())
    first_send = min(fleet.sent.values()) if fleet.sent else start
    busy_s = (ack_times[-1] - first_send) if ack_times else 0.0
    per_worker: dict[str, int] = {}
    for row in rows:
        per_worker[row["worker_id"]] = per_worker.get(row["worker_id"], 0) + 1
    # Steady state: acks in the middle of the sending window, after warm-up.
    warm = min(10.0, duration_s / 4)
    window = [t for t in ack_times if first_send + warm <= t <= first_send + duration_s]
    return {
        "mode": mode_name, "decoder": mode["decoder"], "realism": mode["realism"], "workers": workers,
        "devices": devices, "interval_s": interval_s, "duration_s": duration_s,
        "offered_fps": round(devices / interval_s, 2), "frames_sent": sent, "frames_acked": acked,
        "frames_stored": len(rows), "unique_stored": len({(r["device_id"], r["sequence"]) for r in rows}),
        "throughput_fps": round(acked / busy_s, 3) if busy_s else 0.0,
        "steady_fps": round(len(window) / max(1e-9, duration_s - warm), 3),
        "per_worker_fps": {w: round(n / busy_s, 3) for w, n in sorted(per_worker.items())} if busy_s else {},
        "latency_s": {"p50": round(float(np.percentile(latencies, 50)), 3),
                      "p95": round(float(np.percentile(latencies, 95)), 3)} if latencies.size else {},
        "drain_s": round(max(0.0, busy_s - duration_s), 2),
        "cpu_percent_mean": round(float(np.mean([s["cpu_percent"] for s in timeline])), 1) if timeline else 0,
        "rss_mib_max": max((s["rss_mib"] for s in timeline), default=0),
        "backlog_max": max((s["backlog"] for s in timeline), default=0),
        "timeline": timeline,
    }


def plot_runs(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for run in runs:
        t = [s["t"] for s in run["timeline"]]
        label = f"{run['mode']} x{run['workers']}"
        acked = [s["acked"] for s in run["timeline"]]
        rate = [0] + [(b - a) / max(1e-9, t2 - t1) for a, b, t1, t2 in zip(acked, acked[1:], t, t[1:])]
        axes[0, 0].plot(t, rate, label=label)
        axes[0, 1].plot(t, [s["backlog"] for s in run["timeline"]], label=label)
        axes[1, 0].plot(t, [s["cpu_percent"] for s in run["timeline"]], label=label)
        axes[1, 1].plot(t, [s["rss_mib"] for s in run["timeline"]], label=label)
    for ax, title in zip(axes.flat, ("acked frames/s", "backlog (sent - acked)", "service CPU % (all processes)",
                                     "service RSS MiB (all processes)"), strict=True):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_service_bench(out_dir, devices: int = 200, *, interval_s: float = 3.0, duration_s: float = 60.0,
                      workers: tuple[int, ...] = (1, 2, 3), modes: tuple[str, ...] = ("transport", "cheap", "full"),
                      queue_size: int = 16, batch_size: int = 4, drain_timeout_s: float = 120.0, models_dir=None,
                      device: str = "cpu", seed: int = 0, plot: bool = True) -> dict:
    """Run every (mode, worker count) pair; write service_load.json (+ service_load.png); return the dict.

    A mode whose decoder cannot load (no shipped models yet) is listed under "skipped" with the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "config": {"devices": devices, "interval_s": interval_s, "duration_s": duration_s,
                         "workers": list(workers), "queue_size": queue_size, "batch_size": batch_size,
                         "device": device},
              "runs": [], "skipped": {}}
    real: list[bytes] | None = None
    for mode_name in modes:
        if MODES[mode_name]["decoder"] == "mridc":
            try:
                from mridc.cloud.pipeline import MRIDCDecoder

                MRIDCDecoder.from_models(models_dir=models_dir, device=device)
                real = real or real_streams(models_dir=models_dir)
            except Exception as exc:  # noqa: BLE001 - recorded in the report, the other modes still run
                result["skipped"][mode_name] = f"{type(exc).__name__}: {exc}"
                continue
            streams = real
        else:
            streams = transport_streams()
        for count in workers:
            run = run_once(out_dir, mode_name=mode_name, workers=count, devices=devices, interval_s=interval_s,
                           duration_s=duration_s, streams=streams, queue_size=queue_size, batch_size=batch_size,
                           drain_timeout_s=drain_timeout_s, models_dir=models_dir, device=device, seed=seed)
            result["runs"].append(run)
            print(f"{mode_name} x{count}: {run['throughput_fps']} frames/s acked "
                  f"({run['frames_acked']}/{run['frames_sent']}), per worker {run['per_worker_fps']}, "
                  f"p95 latency {run['latency_s'].get('p95')} s, CPU {run['cpu_percent_mean']}%", flush=True)
    summary = {}
    for run in result["runs"]:
        summary.setdefault(run["mode"], {})[run["workers"]] = run["throughput_fps"]
    result["summary_fps"] = summary
    (out_dir / "service_load.json").write_text(json.dumps(result, indent=1) + "\n")
    if plot and result["runs"]:
        plot_runs(result["runs"], out_dir / "service_load.png")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/results/service_load")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--modes", default="transport,cheap,full")
    parser.add_argument("--device", default="cpu")
    cli = parser.parse_args()
    run_service_bench(cli.out, cli.devices, interval_s=cli.interval, duration_s=cli.duration,
                      workers=tuple(int(w) for w in cli.workers.split(",")), modes=tuple(cli.modes.split(",")),
                      device=cli.device)
