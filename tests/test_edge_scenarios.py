"""Failure scenarios with the real broker, a real gRPC server and the link emulator.

Each one asserts that every frame the edge accepted reaches the cloud exactly once by
(device, sequence) after dedupe, intact and decodable, and that nothing else arrives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_transport_mqtt import wait_until

from mridc.edge.agent import EdgeAgent
from mridc.edge.capture import open_source
from mridc.edge.queue import FrameQueue
from mridc.edge.transport import Backoff, open_transport
from mridc.lab.synthetic import SyntheticEncoder
from mridc.shared.bitstream import decompress

pytestmark = [pytest.mark.net, pytest.mark.timeout(120)]

DEVICE = "cam-01"


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"frame{i:02d}.png"), rng.integers(0, 255, (128, 192, 3), dtype=np.uint8))
    return folder


class RunningAgent:
    """An EdgeAgent on a thread: ``frames`` from a looped image folder at ``fps``, then drain."""

    def __init__(self, tmp_path, image_dir, url, *, frames=40, fps=20.0, token=None):
        self.queue = FrameQueue(tmp_path / "queue.db", DEVICE)
        transport = open_transport(url, DEVICE, token=token, backoff=Backoff(0.2, 1.0))
        self.agent = EdgeAgent(device_id=DEVICE, encoder=SyntheticEncoder(), transport=transport, queue=self.queue,
                               source=open_source(str(image_dir), fps=fps, loop=True, max_frames=frames),
                               ack_timeout_s=4.0, window=4, heartbeat_s=1.0)
        self.stop = threading.Event()
        self.status: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.status = self.agent.run(self.stop, drain_timeout_s=40)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.queue.close()

    def finish(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not finish"
        return self.status


def assert_exactly_once(cloud, accepted: list[int]) -> None:
    assert accepted, "nothing was accepted"
    assert len(set(accepted)) == len(accepted)
    delivered = {key for key in cloud.deliveries}
    assert {seq for dev, seq in delivered} <= set(accepted), "a frame arrived that the edge never accepted"
    assert cloud.sequences(DEVICE) == sorted(accepted), (
        f"missing {sorted(set(accepted) - set(cloud.sequences(DEVICE)))}")
    prior = SyntheticEncoder().prior
    for (device, seq), bitstream in cloud.frames.items():
        frame = decompress(bitstream, prior)
        assert (frame.width, frame.height) == (192, 128), (device, seq)
    assert not cloud.bad


def test_broker_restart_mid_stream(tmp_path, image_dir, mosquitto, mqtt_cloud_factory):
    cloud = mqtt_cloud_factory(mosquitto.port)
    with RunningAgent(tmp_path, image_dir, mosquitto.url, frames=40) as run:
        assert wait_until(lambda: len(cloud.frames) >= 8, 20)
        mosquitto.restart(down_for=1.5)  # persistence on: sessions and queued messages survive
        status = run.finish()
    assert status["queue"]["depth"] == 0, status
    assert status["transport"]["connects"] >= 2
    assert_exactly_once(cloud, run.agent.accepted_sequences)


@pytest.mark.parametrize("protocol", ["mqtt", "grpc"])
def test_link_outage_mid_stream(tmp_path, image_dir, protocol, mosquitto, mqtt_cloud_factory, grpc_cloud_factory,
                                link_factory):
    if protocol == "mqtt":
        cloud, upstream = mqtt_cloud_factory(mosquitto.port), mosquitto.port
    else:
        cloud = grpc_cloud_factory(token="tok")
        upstream = cloud.port
    link = link_factory(upstream, up_bps=256_000, down_bps=256_000, latency_ms=50, jitter_ms=20)
    with RunningAgent(tmp_path, image_dir, f"{protocol}://127.0.0.1:{link.port}", frames=40, token="tok") as run:
        assert wait_until(lambda: len(cloud.frames) >= 8, 20)
        link.outage(3.0, mode="drop")
        assert wait_until(lambda: not link.is_down, 10)
        status = run.finish()
    assert status["queue"]["depth"] == 0, status
    assert status["agent"]["captured"] == 40  # capture never stopped during the outage
    assert_exactly_once(cloud, run.agent.accepted_sequences)


def test_stalled_link_mid_stream(tmp_path, image_dir, mosquitto, mqtt_cloud_factory, link_factory):
    """A stall (no RST, just silence) is detected by the keepalive / ack timeout and recovered from."""
    cloud = mqtt_cloud_factory(mosquitto.port)
    link = link_factory(mosquitto.port, latency_ms=20)
    with RunningAgent(tmp_path, image_dir, f"mqtt://127.0.0.1:{link.port}", frames=30) as run:
        assert wait_until(lambda: len(cloud.frames) >= 5, 20)
        link.outage(3.0, mode="stall")
        status = run.finish()
    assert status["queue"]["depth"] == 0, status
    assert_exactly_once(cloud, run.agent.accepted_sequences)


@pytest.mark.parametrize("protocol", ["mqtt", "grpc"])
def test_cloud_down_for_a_while(tmp_path, image_dir, protocol, mosquitto, mqtt_cloud_factory, grpc_cloud_factory,
                                free_port):
    if protocol == "mqtt":
        cloud = mqtt_cloud_factory(mosquitto.port)
        url = mosquitto.url
    else:
        cloud = grpc_cloud_factory(free_port)
        url = f"grpc://127.0.0.1:{free_port}"
    with RunningAgent(tmp_path, image_dir, url, frames=40) as run:
        assert wait_until(lambda: len(cloud.frames) >= 8, 20)
        cloud.stop()  # MQTT: the broker queues frames in the cloud's persistent session
        time.sleep(3.0)
        assert len(run.queue) > 0  # nothing is acked while the cloud is away, so the queue holds it
        cloud.start()
        status = run.finish()
    assert status["queue"]["depth"] == 0, status
    assert_exactly_once(cloud, run.agent.accepted_sequences)


_EDGE_PROCESS = textwrap.dedent(
    """
    import argparse, sys
    from mridc.edge.cli import add_run_arguments, run_from_args
    from mridc.lab.synthetic import SyntheticEncoder
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    sys.exit(run_from_args(parser.parse_args(), encoder=SyntheticEncoder()))
    """
)


@pytest.mark.parametrize("protocol", ["mqtt", "grpc"])
def test_edge_process_killed_and_restarted(tmp_path, image_dir, protocol, mosquitto, mqtt_cloud_factory,
                                           grpc_cloud_factory):
    """``mridc-edge run`` (the real CLI path, with a TOML config) killed with SIGKILL mid-stream, then
    restarted: frames queued before the kill go out after the restart, sequences continue."""
    if protocol == "mqtt":
        cloud, url = mqtt_cloud_factory(mosquitto.port), mosquitto.url
    else:
        cloud = grpc_cloud_factory(token="secret-token")
        url = f"grpc://127.0.0.1:{cloud.port}"
    (tmp_path / "token").write_text("secret-token\n")
    queue_path = tmp_path / "state" / "queue.db"
    config = tmp_path / "device.toml"
    config.write_text(textwrap.dedent(f"""
        [device]
        id = "{DEVICE}"
        [source]
        uri = "{image_dir}"
        fps = 15.0
        loop = true
        [encoder]
        bpp = 0.05
        [transport]
        url = "{url}"
        token_file = "{tmp_path / 'token'}"
        ack_timeout_s = 4.0
        backoff_initial_s = 0.2
        backoff_max_s = 1.0
        [queue]
        path = "{queue_path}"
        [status]
        heartbeat_s = 1.0
    """))
    command = [sys.executable, "-c", _EDGE_PROCESS, "--config", str(config)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def queued() -> int:
        with FrameQueue(queue_path, DEVICE) as queue:
            return len(queue)

    try:
        assert wait_until(lambda: len(cloud.frames) >= 6, 30), first.stderr.read1().decode() if first.poll() else ""
        cloud.stop()  # acks stop, so the edge has frames on disk that no one acknowledged yet
        assert wait_until(lambda: queued() >= 5, 20)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    with FrameQueue(queue_path, DEVICE) as queue:
        accepted_before = queue.next_sequence - 1
        left_behind = len(queue)
    assert left_behind >= 5
    cloud.start()
    second = subprocess.run(command + ["--max-frames", "10", "--drain-timeout", "30"], check=False, capture_output=True,
                            text=True, env=env, timeout=90)
    assert second.returncode == 0, second.stderr[-3000:]
    with FrameQueue(queue_path, DEVICE) as queue:
        assert len(queue) == 0
        accepted = list(range(1, queue.next_sequence))
    assert len(accepted) == accepted_before + 10
    assert_exactly_once(cloud, accepted)


def test_a_finite_source_is_delivered_before_the_agent_exits(tmp_path, image_dir, mosquitto, mqtt_cloud_factory,
                                                              link_factory):
    """`mridc-edge run --source FOLDER` with default flags: every frame acked before exit 0. With no cloud
    and a short --drain-timeout: exit 3, and the message names the frames still queued."""
    cloud = mqtt_cloud_factory(mosquitto.port)
    # A slow link, so that the source is read long before the last ack can arrive.
    link = link_factory(mosquitto.port, up_bps=24_000, down_bps=24_000, latency_ms=300)
    queue_path = tmp_path / "queue.db"
    base = [sys.executable, "-c", _EDGE_PROCESS, "--source", str(image_dir), "--device-id", DEVICE,
            "--queue", str(queue_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(base + ["--transport", f"mqtt://127.0.0.1:{link.port}"], capture_output=True, text=True,
                          env=env, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every frame acknowledged" in done.stderr
    with FrameQueue(queue_path, DEVICE) as queue:
        assert len(queue) == 0
        accepted = list(range(1, queue.next_sequence))
    assert len(accepted) == 6
    assert_exactly_once(cloud, accepted)

    cloud.stop()  # nobody acks now
    stuck = subprocess.run(base + ["--transport", f"mqtt://127.0.0.1:{mosquitto.port}", "--drain-timeout", "2"],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
    assert stuck.returncode == 3, stuck.stderr[-3000:]
    assert "6 frame(s) not acknowledged after 2 s" in stuck.stderr and "sequences 7, 8, 9, 10, 11, 12" in stuck.stderr
    with FrameQueue(queue_path, DEVICE) as queue:
        assert len(queue) == 6  # kept for the next run


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["mqtt", "grpc"])
def test_link_outage_of_30_seconds(tmp_path, image_dir, protocol, mosquitto, mqtt_cloud_factory, grpc_cloud_factory,
                                   link_factory):
    """The issue's 30 s outage on a 64 kbit/s, 300 ms link, at 1 frame/s."""
    if protocol == "mqtt":
        cloud, upstream = mqtt_cloud_factory(mosquitto.port), mosquitto.port
    else:
        cloud = grpc_cloud_factory()
        upstream = cloud.port
    link = link_factory(upstream, up_bps=64_000, down_bps=64_000, latency_ms=300, jitter_ms=50)
    with RunningAgent(tmp_path, image_dir, f"{protocol}://127.0.0.1:{link.port}", frames=60, fps=1.0) as run:
        assert wait_until(lambda: len(cloud.frames) >= 5, 30)
        link.outage(30.0, mode="drop")
        status = run.finish(timeout=200)
    assert status["queue"]["depth"] == 0, status
    assert_exactly_once(cloud, run.agent.accepted_sequences)


# -- agent wiring: config, policies, fleet ------------------------------------------------------------


class OfflineTransport:
    """A transport whose link never comes up (the queue must absorb everything)."""

    connected = False

    def __init__(self):
        self.on_ack = self.on_reset = None
        self.stats = {}

    def start(self):
        pass

    def send(self, envelope):
        return False

    def publish_status(self, status):
        pass

    def close(self):
        pass


def test_full_queue_with_lower_bpp_policy_lowers_the_rate_and_counts_drops(tmp_path, image_dir):
    queue = FrameQueue(tmp_path / "q.db", DEVICE, max_frames=4, policy="lower_bpp", pressure_watermark=0.5)
    agent = EdgeAgent(device_id=DEVICE, encoder=SyntheticEncoder(), transport=OfflineTransport(), queue=queue,
                      source=open_source(str(image_dir), loop=True, max_frames=8), bpp=0.08, min_bpp=0.02)
    status = agent.run()
    assert status["agent"]["accepted"] == 8 and status["queue"]["depth"] == 4
    assert status["queue"]["dropped_oldest"] == 4 and status["agent"]["dropped_oldest"] == 4
    assert agent.stats["bpp_lowered"] >= 2 and agent.current_bpp < 0.08
    sizes = [float(f.meta["target_bpp"]) for f in queue.pending()]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 0.02
    queue.close()


def test_config_file_cli_overrides_and_clear_errors(tmp_path, capsys):
    import argparse

    from mridc.edge.cli import add_run_arguments, config_from_args, run_from_args
    from mridc.edge.config import ConfigError, load_config

    config = tmp_path / "device.toml"
    config.write_text(textwrap.dedent("""
        [device]
        id = "cam-07"
        [source]
        uri = "camera:0"
        fps = 0.5
        [encoder]
        bpp = 0.03
        rois = [{x = 10, y = 20, w = 100, h = 50}]
        [transport]
        url = "mqtt://127.0.0.1:1883"
        [queue]
        policy = "drop_newest"
        max_frames = 50
    """))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(config), "--bpp", "0.01", "--transport",
                                              "grpc://127.0.0.1:50051", "--queue", str(tmp_path / "q.db")]))
    assert (cfg.device.id, cfg.encoder.bpp, cfg.transport.url, cfg.source.fps) == (
        "cam-07", 0.01, "grpc://127.0.0.1:50051", 0.5)
    assert cfg.encoder.min_bpp <= 0.01 and cfg.encoder.rois[0].w == 100 and cfg.queue.max_frames == 50
    assert cfg.queue_path() == tmp_path / "q.db"

    bad = tmp_path / "bad.toml"
    bad.write_text('[queue]\nmax_frame = 10\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) max_frame in \[queue\]; known keys: path, max_frames"):
        load_config(bad)
    bad.write_text('[device]\nid = "cam 01"\n[transport]\nurl = "mqtt://h:1"\n')
    assert run_from_args(parser.parse_args(["--config", str(bad)]), encoder=SyntheticEncoder()) == 2
    assert "device.id 'cam 01' must match" in capsys.readouterr().err
    assert run_from_args(parser.parse_args(["--device-id", "cam-1", "--transport", "ftp://x"]),
                         encoder=SyntheticEncoder()) == 2
    assert "transport.url" in capsys.readouterr().err


def test_fleet_of_three_devices(tmp_path, image_dir, mosquitto, mqtt_cloud_factory):
    from mridc.lab.fleet import Fleet

    cloud = mqtt_cloud_factory(mosquitto.port)
    fleet = Fleet(devices=3, source=str(image_dir), transport_url=mosquitto.url, workdir=tmp_path / "fleet",
                  fps=20.0, max_frames=4, start_spread_s=0.2)
    report = fleet.run(duration_s=60, drain_timeout_s=20)
    assert (report["errors"], report["accepted"], report["acked"], report["queued"]) == (0, 12, 12, 0)
    for device_id in fleet.device_ids:
        assert cloud.sequences(device_id) == [1, 2, 3, 4]


def test_deploy_doc_config_matches_the_code():
    """docs/deploy-edge.md: the sample TOML parses, and every config field has a row in its tables."""
    import dataclasses
    import re
    import tomllib

    from mridc.edge.config import DeviceConfig, config_from_dict

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy-edge.md").read_text()
    sample = re.search(r"```toml\n(.*?)```", doc, re.DOTALL).group(1)
    config = config_from_dict(tomllib.loads(sample))
    assert config.device.id == "cam-01"
    for section in dataclasses.fields(DeviceConfig):
        for fld in dataclasses.fields(getattr(config, section.name)):
            assert re.search(rf"^\| `[^|]*\b{fld.name}\b[^|]*` \|", doc, re.MULTILINE), (
                f"{section.name}.{fld.name} undocumented")


@pytest.mark.parametrize("protocol", ["mqtt", "grpc"])
def test_edge_agent_against_the_real_cloud_service(tmp_path, image_dir, protocol, mosquitto):
    """The same agent against cloud/service (in-process worker, test decoder): frames stored, queue empty."""
    from mridc.cloud.service import server
    from mridc.cloud.service.config import ServiceConfig
    from mridc.lab.synthetic import TokenPaintDecoder

    config = ServiceConfig(out_dir=tmp_path / "cloud", mqtt_url=mosquitto.url if protocol == "mqtt" else None,
                           grpc_addr="127.0.0.1:0" if protocol == "grpc" else None, allow_insecure=True,
                           worker_id="edge-e2e", rate_limit_fps=0)
    worker = server.Worker(config, decoder=TokenPaintDecoder())
    ready = worker.start()
    try:
        url = mosquitto.url if protocol == "mqtt" else f"grpc://127.0.0.1:{ready['grpc_port']}"
        queue = FrameQueue(tmp_path / "queue.db", DEVICE)
        agent = EdgeAgent(device_id=DEVICE, encoder=SyntheticEncoder(),
                          transport=open_transport(url, DEVICE, backoff=Backoff(0.2, 1.0)), queue=queue,
                          source=open_source(str(image_dir), fps=20, loop=True, max_frames=10), ack_timeout_s=10)
        status = agent.run(drain_timeout_s=30)
        assert status["queue"]["depth"] == 0, status
        assert status["queue"]["acked_stored"] + status["queue"]["acked_duplicate"] == 10, status["queue"]
        queue.close()
    finally:
        worker.stop(drain_timeout=5)
    assert len(list((tmp_path / "cloud").rglob("*[0-9].png"))) == 10


def test_capture_sources(tmp_path, image_dir):
    from mridc.edge.capture import CaptureError

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    for i in range(12):
        writer.write(np.full((64, 96, 3), i * 20, dtype=np.uint8))
    writer.release()
    frames = list(open_source(str(video), size=(48, 32)))
    assert len(frames) == 12 and frames[0].image.shape == (32, 48, 3) and frames[0].image.dtype == np.uint8
    assert len(list(open_source(str(video), fps=5.0, max_frames=100))) == 6  # 10 fps file subsampled to 5
    looped = list(open_source(str(image_dir), loop=True, max_frames=9))
    assert [f.name for f in looped[:7]] == [f"frame{i:02d}.png" for i in range(6)] + ["frame00.png"]
    for bad, message in (("camera:x", "camera:INDEX"), (str(tmp_path / "nope"), "neither")):
        with pytest.raises(CaptureError, match=message):
            open_source(bad)
