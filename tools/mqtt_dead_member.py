"""Measure what mosquitto does with a shared-subscription member that dies and is not restarted (#2662).

Real mosquitto, two real `mridc-cloud serve` processes (test decoder, 0.5 s per frame, queue 4), one device
publishing 20 frames at QoS 1. One worker is killed with SIGKILL and not restarted. Then:
1. for `--wait` seconds nothing is resent: which frames the broker hands to the survivor by itself;
2. the device resends every frame without an ack (as the agent does after `transport.ack_timeout_s`), every
   2 s, until all are acked: how long that recovery takes.
Run once with fixed worker ids (persistent 1 h sessions) and once with generated ids (30 s sessions).

    python tools/mqtt_dead_member.py --out docs/results/mosquitto_2662
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from mridc.lab.broker import MosquittoBroker, find_mosquitto
from mridc.lab.provenance import machine, write_json_atomic
from mridc.lab.synthetic import SYNTHETIC_MODEL_ID, synthetic_stream
from mridc.shared.protocol import acks_topic, build_envelope, frames_topic
from mridc.v1 import mridc_pb2

DEVICE = "cam-2662"


def make_envelope(device: str, sequence: int):
    return build_envelope(device, sequence, synthetic_stream(f"{device}/{sequence}"), SYNTHETIC_MODEL_ID)


def mosquitto_version() -> str:
    out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def start_worker(broker, out: Path, worker_id: str | None, log) -> tuple[subprocess.Popen, dict]:
    args = [sys.executable, "-m", "mridc.cloud.service.cli", "serve", "--mqtt", broker.url, "--out", str(out),
            "--decoder", "mridc.lab.synthetic:make_token_paint_decoder", "--rate-limit", "0", "--queue-size", "4",
            "--batch-size", "1", "--refine-realism", "0"]
    if worker_id:
        args += ["--worker-id", worker_id]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log,
                            env={**os.environ, "MRIDC_TEST_DECODE_DELAY_S": "0.5"})
    for line in proc.stdout:
        data = json.loads(line)
        if data.get("event") == "ready":
            return proc, data
    raise RuntimeError("worker exited before it was ready")


def scenario(broker, out: Path, fixed_ids: bool, frames: int, wait_s: float) -> dict:
    log = open(out / "service.log", "ab")  # noqa: SIM115
    workers = [start_worker(broker, out / "store", f"w{i}" if fixed_ids else None, log) for i in range(2)]
    acks: dict[int, float] = {}
    lock = threading.Lock()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv5)

    def on_message(c, u, message):
        ack = mridc_pb2.FrameAck()
        ack.ParseFromString(message.payload)
        with lock:
            acks.setdefault(ack.sequence, time.monotonic())

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(acks_topic(DEVICE), qos=1)
    client.loop_start()
    time.sleep(0.5)
    for seq in range(1, frames + 1):
        client.publish(frames_topic(DEVICE), make_envelope(DEVICE, seq).SerializeToString(), qos=1)
    time.sleep(1.0)  # both workers now hold unacked frames
    victim_proc, victim = workers[1]
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    victim_proc.wait()
    time.sleep(wait_s)
    with lock:
        by_themselves = sorted(acks)
    missing_after_wait = [s for s in range(1, frames + 1) if s not in by_themselves]
    resends = 0
    while True:
        with lock:
            missing = [s for s in range(1, frames + 1) if s not in acks]
        if not missing or time.monotonic() - killed > wait_s + 180:
            break
        for seq in missing:
            client.publish(frames_topic(DEVICE), make_envelope(DEVICE, seq).SerializeToString(), qos=1)
            resends += 1
        time.sleep(2.0)
    recovered = time.monotonic()
    client.loop_stop()
    client.disconnect()
    survivor_proc, _ = workers[0]
    survivor_proc.send_signal(signal.SIGTERM)
    survivor_proc.wait(60)
    log.close()
    return {"worker_ids": "fixed (w0, w1: 1 h sessions)" if fixed_ids else "generated (HOST-PID: 30 s sessions)",
            "frames": frames, "acked_before_kill_plus_wait": len(by_themselves),
            "stuck_without_resend": missing_after_wait, "wait_s": wait_s, "resends": resends,
            "all_acked": not missing, "seconds_from_kill_to_all_acked": round(recovered - killed, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--wait", type=float, default=20.0, help="seconds without resends after the kill")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = []
    for fixed in (True, False):
        run_dir = out / ("fixed" if fixed else "generated")
        run_dir.mkdir(parents=True, exist_ok=True)
        with MosquittoBroker(persistence=True) as broker:
            results.append(scenario(broker, run_dir, fixed, args.frames, args.wait))
        print(json.dumps(results[-1]), flush=True)
    doc = {"meta": {"command": "python tools/mqtt_dead_member.py " + " ".join(argv or sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                    "mosquitto": mosquitto_version()}, "results": results}
    write_json_atomic(out / "result.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
