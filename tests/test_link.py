"""Link emulator: bytes pass unchanged, at the shaped rate and delay; outages drop or stall; CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_transport_mqtt import fill_queue, forwarding, wait_until

from mridc.edge.queue import FrameQueue
from mridc.edge.transport import open_transport
from mridc.firmware_sim.cli import build_parser, link_options
from mridc.lab.link import PROFILES, LinkEmulator

pytestmark = [pytest.mark.net, pytest.mark.timeout(60)]


@pytest.fixture
def echo_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(conn=conn):
                with conn:
                    while data := conn.recv(65536):
                        conn.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def roundtrip(port: int, payload: bytes, timeout: float = 20.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - start


def test_bytes_unchanged_at_the_shaped_rate(echo_port, link_factory):
    payload = os.urandom(8000)
    link = link_factory(echo_port, up_bps=64_000)
    got, seconds = roundtrip(link.port, payload)
    assert got == payload
    assert 0.85 <= seconds <= 2.0, seconds  # 64 000 bits at 64 kbit/s (down is unlimited)
    assert link.stats["bytes_up"] == link.stats["bytes_down"] == 8000


def test_latency_and_jitter_keep_order(echo_port, link_factory):
    link = link_factory(echo_port, latency_ms=150, jitter_ms=50, seed=1)
    with socket.create_connection(("127.0.0.1", link.port)) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        rtt = time.monotonic() - start
        assert 0.2 <= rtt <= 0.6, rtt
        payload = bytes(range(256)) * 40
        for i in range(0, len(payload), 100):  # many small writes, each with its own jitter
            sock.sendall(payload[i:i + 100])
        got = b""
        while len(got) < len(payload):
            got += sock.recv(65536)
        assert got == payload


def test_drop_outage_resets_and_refuses_then_recovers(echo_port, link_factory):
    link = link_factory(echo_port)
    sock = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    assert roundtrip(link.port, b"hello")[0] == b"hello"
    link.outage(0.8, mode="drop")
    with pytest.raises(OSError):
        sock.sendall(b"x")
        if not sock.recv(1):
            raise ConnectionResetError("closed")
    sock.close()
    with pytest.raises(OSError):
        got, _ = roundtrip(link.port, b"during outage", timeout=1)
        if not got:
            raise ConnectionResetError("refused")
    time.sleep(1.0)
    assert roundtrip(link.port, b"after")[0] == b"after"
    actions = [e["action"] for e in link.events]
    assert "down" in actions and "up" in actions and link.stats["reset"] >= 1


def test_stall_outage_holds_data_until_the_link_returns(echo_port, link_factory):
    link = link_factory(echo_port)
    with socket.create_connection(("127.0.0.1", link.port), timeout=5) as sock:
        link.set_down("stall")
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(16)
        link.set_up()
        sock.settimeout(5)
        assert sock.recv(16) == b"held"


def test_scheduled_outages_are_logged(echo_port, link_factory):
    link = link_factory(echo_port, outage_every_s=0.3, outage_for_s=0.2, outage_mode="stall")
    assert wait_until(lambda: link.stats["outages"] >= 2, 5)
    downs = [e for e in link.events if e["action"] == "down"]
    assert downs[0]["mode"] == "stall" and "every" in downs[0]["reason"]


def test_cli_profile_then_explicit_flags_override():
    args = build_parser().parse_args(["link", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1883",
                                      "--profile", "lora-like", "--latency", "50", "--up-bandwidth", "4800"])
    options = link_options(args)
    assert options["latency_ms"] == 50 and options["up_bps"] == 4800
    assert options["down_bps"] == PROFILES["lora-like"].down_bps
    assert options["jitter_ms"] == PROFILES["lora-like"].jitter_ms


def test_cli_help_runs():
    for command in (["--help"], ["link", "--help"], ["fleet", "--help"]):
        out = subprocess.run([sys.executable, "-m", "mridc.firmware_sim.cli", *command], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        assert "usage: mridc-sim" in out
    assert "nbiot" in out or "--devices" in out


def test_mqtt_passes_through_unchanged(tmp_path, mosquitto, mqtt_cloud_factory, link_factory):
    cloud = mqtt_cloud_factory(mosquitto.port)
    link = link_factory(mosquitto.port, up_bps=64_000, down_bps=64_000, latency_ms=100, jitter_ms=30)
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    sequences = fill_queue(queue, 5)
    expected = {f.sequence: f.bitstream for f in queue.pending(limit=10)}
    with forwarding(queue, open_transport(f"mqtt://127.0.0.1:{link.port}", "cam-01")):
        assert wait_until(lambda: len(queue) == 0, 30)
    assert cloud.sequences("cam-01") == sequences
    assert {seq: cloud.frames[("cam-01", seq)] for seq in sequences} == expected
    assert link.stats["bytes_up"] > sum(len(b) for b in expected.values())


def test_grpc_passes_through_unchanged(tmp_path, grpc_cloud_factory, link_factory):
    cloud = grpc_cloud_factory(token="t")
    link = link_factory(cloud.port, up_bps=64_000, down_bps=64_000, latency_ms=100, jitter_ms=30)
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    sequences = fill_queue(queue, 5)
    expected = {f.sequence: f.bitstream for f in queue.pending(limit=10)}
    transport = open_transport(f"grpc://127.0.0.1:{link.port}", "cam-01", token="t")
    with forwarding(queue, transport):
        assert wait_until(lambda: len(queue) == 0, 30), transport.last_error
    assert cloud.sequences("cam-01") == sequences
    assert {seq: cloud.frames[("cam-01", seq)] for seq in sequences} == expected


def test_emulator_rejects_bad_options():
    with pytest.raises(ValueError, match="outage mode"):
        LinkEmulator(("127.0.0.1", 1), outage_mode="flaky")
    with pytest.raises(ValueError, match="HOST:PORT"):
        LinkEmulator("nohost")
