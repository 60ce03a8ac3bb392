"""The UDP link emulator over real loopback sockets: loss rates, bursts, MTU, duplicates, reordering, delay."""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest

from mridc.lab.datagram import DatagramLink, Impairments

pytestmark = pytest.mark.net


class EchoServer:
    """UDP server that records what it got (payloads carry a sequence number) and echoes it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.got: list[int] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.got.append(int.from_bytes(data[:4], "big"))
            self.sock.sendto(data, addr)

    def close(self):
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def send_all(port: int, n: int, size: int = 32, gap_s: float = 0.0) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        client.sendto(i.to_bytes(4, "big") + bytes(size - 4), ("127.0.0.1", port))
        if gap_s:
            time.sleep(gap_s)
    return client


def wait_quiet(server: EchoServer, settle_s: float = 0.5, timeout: float = 10.0) -> None:
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        if len(server.got) != last:
            last, since = len(server.got), time.monotonic()
        elif time.monotonic() - since > settle_s:
            return
        time.sleep(0.05)


@pytest.fixture
def server():
    s = EchoServer()
    yield s
    s.close()


def test_bernoulli_loss_drops_about_that_fraction_and_echoes_come_back(server):
    with DatagramLink(("127.0.0.1", server.port), up=Impairments(loss=0.2), seed=3) as link:
        client = send_all(link.port, 2000, gap_s=0.0002)
        wait_quiet(server)
        client.settimeout(1.0)
        echo = client.recvfrom(65536)[0]  # replies find their way back to the sender's address
        time.sleep(0.3)
        stats = link.stats
    assert 0.17 < 1 - len(server.got) / 2000 < 0.23
    assert stats["up"]["lost"] == 2000 - len(server.got)
    assert stats["down"]["datagrams"] == stats["down"]["delivered"] == len(server.got)  # the way back is clean
    assert int.from_bytes(echo[:4], "big") in set(server.got) and stats["clients"] == 1


def _mean_burst(received: set[int], n: int) -> float:
    bursts, run = [], 0
    for i in range(n):
        if i in received:
            if run:
                bursts.append(run)
            run = 0
        else:
            run += 1
    return sum(bursts) / max(1, len(bursts))


def test_gilbert_elliott_loss_comes_in_bursts_at_the_same_mean(server):
    with DatagramLink(("127.0.0.1", server.port), up=Impairments(loss=0.2, loss_model="gilbert"), seed=5) as link:
        send_all(link.port, 3000, gap_s=0.0002)
        wait_quiet(server)
    got = set(server.got)
    assert 0.14 < 1 - len(got) / 3000 < 0.26
    assert _mean_burst(got, 3000) > 2.5  # Bernoulli at 0.2 gives about 1.25


def test_mtu_duplicates_reordering_and_latency(server):
    imp = Impairments(mtu=100, duplicate=0.3, reorder=0.3, reorder_ms=30, latency_ms=100)
    with DatagramLink(("127.0.0.1", server.port), up=imp, seed=7) as link:
        t0 = time.monotonic()
        send_all(link.port, 1, size=32)
        while not server.got and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        assert time.monotonic() - t0 >= 0.095  # one-way latency
        send_all(link.port, 5, size=500)  # over the MTU: all dropped
        send_all(link.port, 400, size=32, gap_s=0.001)
        wait_quiet(server)
        stats = link.stats["up"]
    assert stats["mtu_drops"] == 5
    assert stats["duplicated"] > 60 and len(server.got) == 401 + stats["duplicated"]
    order = server.got[1:]
    assert any(b < a for a, b in itertools.pairwise(order))  # reordered


def test_bandwidth_and_duty_cycle_pace_the_sender(server):
    # 10 datagrams of 100 bytes at 80 kbit/s take 0.1 s of airtime; a 10 % duty cycle stretches it to ~1 s.
    with DatagramLink(("127.0.0.1", server.port), up=Impairments(rate_bps=80_000, duty_cycle=0.1)) as link:
        t0 = time.monotonic()
        send_all(link.port, 10, size=100)
        while len(server.got) < 10 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
    assert len(server.got) == 10 and 0.8 < elapsed < 3.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="loss_model"):
        Impairments(loss_model="markov")
    with pytest.raises(ValueError, match="loss must be"):
        Impairments(loss=1.5)
    with pytest.raises(ValueError, match="duty_cycle"):
        Impairments(duty_cycle=0)


def test_mridc_sim_link_udp_runs_from_the_command_line(server, tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mridc.firmware_sim.cli", "link", "--udp", "--listen", "127.0.0.1:0",
                             "--upstream", f"127.0.0.1:{server.port}", "--udp-profile", "lora", "--loss", "0.5",
                             "--latency", "0", "--duration", "3", "--seed", "1"],
                            stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("link listening on udp://127.0.0.1:"), first
    port = int(first.split()[3].rsplit(":", 1)[1])
    send_all(port, 20, size=64)
    send_all(port, 2, size=300)  # over the LoRa MTU of 222
    out, _ = proc.communicate(timeout=20)
    stats = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and stats["up"]["datagrams"] == 22 and stats["up"]["mtu_drops"] == 2
    assert 0 < stats["up"]["lost"] < 20
