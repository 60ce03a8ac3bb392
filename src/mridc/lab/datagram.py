"""A UDP link emulator: real datagrams between a device and an upstream server, lost, late and reordered.

>>> with DatagramLink(("127.0.0.1", coap_port), loss=0.2, mtu=222, seed=1) as link:
...     send datagrams to ("127.0.0.1", link.port)

Each client address gets its own upstream socket, so replies find their way back. Per direction
(`up`: device -> upstream, `down`: back), in this order:
- `mtu`: a datagram larger than this is dropped (counted as `mtu_drops`), as a LoRaWAN or NB-IoT radio would;
- loss: `loss_model="bernoulli"` drops each datagram with probability `loss`; `"gilbert"` is a two-state
  Gilbert-Elliott channel (good -> bad with `p_gb`, bad -> good with `p_bg`, loss `loss_bad` in the bad
  state and `loss_good` in the good one) for bursts; with only `loss` given, `p_gb`/`p_bg` are chosen so the
  mean loss is `loss` with bursts of 1/`p_bg` = 4 datagrams on average;
- `duplicate`: the datagram is also delivered a second time;
- bandwidth (`rate_bps`, a token bucket that queues, never drops) and a duty-cycle limit (`duty_cycle`: after
  an airtime of t seconds the sender stays silent t * (1/duty - 1), as EU868 LoRa rules require);
- `latency_ms` plus uniform `jitter_ms`, which reorders datagrams (`reorder` adds an extra delay of up to
  `reorder_ms` to that fraction of datagrams).
Every decision comes from one seeded random stream per direction, so a run can be repeated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Self

log = logging.getLogger("mridc.sim.datagram")

LOSS_MODELS = ("bernoulli", "gilbert")


@dataclass
class Impairments:
    """What one direction of the link does to datagrams."""

    loss: float = 0.0
    loss_model: str = "bernoulli"
    p_gb: float | None = None
    p_bg: float | None = None
    loss_good: float = 0.0
    loss_bad: float = 1.0
    mtu: int | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_ms: float = 50.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_bps: float | None = None
    duty_cycle: float | None = None

    def __post_init__(self) -> None:
        if self.loss_model not in LOSS_MODELS:
            raise ValueError(f"loss_model must be one of {LOSS_MODELS}, got {self.loss_model!r}")
        for name in ("loss", "duplicate", "reorder", "loss_good", "loss_bad"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.duty_cycle is not None and not 0.0 < self.duty_cycle <= 1.0:
            raise ValueError(f"duty_cycle must be in (0, 1], got {self.duty_cycle}")
        if self.mtu is not None and self.mtu < 1:
            raise ValueError(f"mtu must be >= 1, got {self.mtu}")
        if self.loss_model == "gilbert":
            if self.p_bg is None:
                self.p_bg = 0.25  # mean burst of 4 datagrams
            if self.p_gb is None:
                # stationary P(bad) = p_gb / (p_gb + p_bg); mean loss = P(bad) * loss_bad + P(good) * loss_good
                target = min(max(self.loss, 0.0), 0.99)
                span = self.loss_bad - self.loss_good
                pi_bad = 0.0 if span <= 0 else min(max((target - self.loss_good) / span, 0.0), 0.99)
                self.p_gb = self.p_bg * pi_bad / (1 - pi_bad)


# Datagram presets (explicit options override them). LoRa: EU868 SF7/125 kHz, about 5.5 kbit/s, 222-byte
# payloads, a 1 % duty cycle. NB-IoT: about 20 kbit/s up, 1 s latency, non-IP data delivery sized packets.
DATAGRAM_PROFILES = {
    "lora": {"rate_bps": 5_470, "mtu": 222, "duty_cycle": 0.01, "latency_ms": 300, "jitter_ms": 50},
    "nbiot": {"rate_bps": 20_000, "mtu": 1_280, "latency_ms": 1000, "jitter_ms": 300},
}


@dataclass
class DirectionStats:
    datagrams: int = 0
    delivered: int = 0
    lost: int = 0
    mtu_drops: int = 0
    duplicated: int = 0
    reordered: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _Direction:
    """The channel model of one direction: decides each datagram's fate and its delivery times."""

    def __init__(self, imp: Impairments, seed: int) -> None:
        self.imp = imp
        self.rng = random.Random(seed)
        self.bad = False
        self.next_free = 0.0  # when the radio may send again (bandwidth and duty cycle)
        self.last_delivery = 0.0
        self.stats = DirectionStats()

    def _lost(self) -> bool:
        imp = self.imp
        if imp.loss_model == "bernoulli":
            return self.rng.random() < imp.loss
        # Gilbert-Elliott: the state moves first, then the datagram is lost with the state's loss rate.
        if self.bad:
            self.bad = self.rng.random() >= imp.p_bg
        else:
            self.bad = self.rng.random() < imp.p_gb
        return self.rng.random() < (imp.loss_bad if self.bad else imp.loss_good)

    def schedule(self, size: int, now: float) -> list[float]:
        """Delivery times (monotonic seconds) of one datagram of `size` bytes: [] lost, two if duplicated."""
        imp, st = self.imp, self.stats
        st.datagrams += 1
        st.bytes_in += size
        if imp.mtu is not None and size > imp.mtu:
            st.mtu_drops += 1
            return []
        start = max(now, self.next_free)
        airtime = size * 8 / imp.rate_bps if imp.rate_bps else 0.0
        done = start + airtime
        silence = airtime * (1 / imp.duty_cycle - 1) if imp.duty_cycle and airtime else 0.0
        self.next_free = done + silence
        if self._lost():
            st.lost += 1
            return []
        copies = 2 if self.rng.random() < imp.duplicate else 1
        st.duplicated += copies - 1
        times = []
        for _ in range(copies):
            delay = imp.latency_ms / 1000 + self.rng.uniform(-imp.jitter_ms, imp.jitter_ms) / 1000
            if self.rng.random() < imp.reorder:
                delay += self.rng.uniform(0, imp.reorder_ms) / 1000
            when = done + max(0.0, delay)
            if when < self.last_delivery:
                st.reordered += 1
            self.last_delivery = max(self.last_delivery, when)
            times.append(when)
        st.delivered += copies
        st.bytes_out += size * copies
        return times


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, link: DatagramLink, client: tuple[str, int]) -> None:
        self.link, self.client = link, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.link._forward(self.link._down, data, lambda d: self.link._listen.sendto(d, self.client))


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, link: DatagramLink) -> None:
        self.link = link

    def datagram_received(self, data: bytes, addr) -> None:
        self.link._from_client(data, addr)


@dataclass
class DatagramLink:
    """UDP proxy: `upstream` (host, port) behind an impaired link; devices send to (`listen_host`, `port`)."""

    upstream: tuple[str, int]
    listen: tuple[str, int] = ("127.0.0.1", 0)
    up: Impairments = field(default_factory=Impairments)
    down: Impairments = field(default_factory=Impairments)
    seed: int = 0
    max_clients: int = 256

    def __post_init__(self) -> None:
        self._up = _Direction(self.up, self.seed * 2 + 1)
        self._down = _Direction(self.down, self.seed * 2 + 2)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[tuple[str, int], _Upstream] = {}
        self._ready = threading.Event()
        self.port = 0
        self.rejected_clients = 0

    @classmethod
    def symmetric(cls, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0), *, seed: int = 0,
                  **impairments) -> DatagramLink:
        """The same impairments both ways, each direction with its own random stream."""
        return cls(upstream, listen, Impairments(**impairments), Impairments(**impairments), seed)

    @property
    def address(self) -> str:
        return f"udp://{self.listen[0]}:{self.port}"

    @property
    def stats(self) -> dict:
        return {"up": vars(self._up.stats).copy(), "down": vars(self._down.stats).copy(),
                "clients": len(self._clients), "rejected_clients": self.rejected_clients}

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._main, name="mridc-datagram-link", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("datagram link did not start")
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        transport, _ = loop.run_until_complete(loop.create_datagram_endpoint(lambda: _Listener(self),
                                                                             local_addr=self.listen))
        self._listen = transport
        self.port = transport.get_extra_info("sockname")[1]
        self._ready.set()
        loop.run_forever()
        for client in self._clients.values():
            if client.transport is not None:
                client.transport.close()
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- event loop side ----------------------------------------------------------------------------------
    def _from_client(self, data: bytes, addr) -> None:
        client = self._clients.get(addr)
        if client is None:
            if len(self._clients) >= self.max_clients:
                self.rejected_clients += 1
                return
            client = self._clients[addr] = _Upstream(self, addr)
            self._loop.create_task(self._open(client, data))
            return
        if client.transport is None:
            self._loop.call_later(0.01, self._from_client, data, addr)  # its socket is still opening
            return
        self._forward(self._up, data, client.transport.sendto)

    async def _open(self, client: _Upstream, first: bytes) -> None:
        await self._loop.create_datagram_endpoint(lambda: client, remote_addr=self.upstream)
        self._forward(self._up, first, client.transport.sendto)

    def _forward(self, direction: _Direction, data: bytes, send) -> None:
        now = time.monotonic()
        for when in direction.schedule(len(data), now):
            self._loop.call_later(max(0.0, when - now), send, data)
