"""A bad-link emulator: a TCP proxy on loopback that real MQTT and gRPC traffic passes through.

Per direction it shapes bandwidth with a token bucket, adds latency and jitter (without
reordering: TCP would not), and it can take the link down on a schedule, at random or on demand:

- ``drop``: every open connection is reset and new ones are refused until the link is back;
- ``stall``: connections stay open but no byte moves until the link is back.

"up" is client -> upstream (camera -> cloud), "down" is upstream -> client. All connections
through one emulator share its bandwidth, like one modem.

>>> with LinkEmulator(("127.0.0.1", broker.port), **PROFILES["nbiot"].as_kwargs()) as link:
...     client.connect("127.0.0.1", link.port)
...     link.outage(5.0, mode="drop")

Every action is logged on the ``mridc.sim.link`` logger and recorded in ``link.events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Self

log = logging.getLogger("mridc.sim.link")

OUTAGE_MODES = ("drop", "stall")


@dataclass(frozen=True)
class LinkProfile:
    """Typical numbers for a class of link; explicit options override them."""

    up_bps: float
    down_bps: float
    latency_ms: float
    jitter_ms: float
    description: str = ""

    def as_kwargs(self) -> dict:
        d = asdict(self)
        d.pop("description")
        return d


PROFILES = {
    # NB-IoT (Cat-NB1/NB2): tens of kbit/s in practice, second-scale latency.
    "nbiot": LinkProfile(20_000, 25_000, 1000, 300, "NB-IoT: ~20 kbit/s up, 1 s latency"),
    # LTE-M (Cat-M1): a few hundred kbit/s, ~100-200 ms latency.
    "lte-m": LinkProfile(375_000, 375_000, 150, 50, "LTE-M: ~375 kbit/s, 150 ms latency"),
    # LoRa-class backhaul (fastest LoRa data rates, or a 9600 baud radio modem).
    "lora-like": LinkProfile(9_600, 9_600, 300, 100, "LoRa-class: 9.6 kbit/s, 300 ms latency"),
}


class TokenBucket:
    """``rate_bps`` bits per second, bursts of at most ``burst_bytes``; ``None`` rate = unlimited."""

    def __init__(self, rate_bps: float | None, burst_bytes: int | None = None) -> None:
        self.rate = None if not rate_bps else rate_bps / 8.0  # bytes per second
        self.burst = burst_bytes or (max(512, int(self.rate * 0.02)) if self.rate else 1 << 20)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        async with self._lock:  # first come, first served across connections
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < n:
                await asyncio.sleep((n - self.tokens) / self.rate)
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
            self.tokens -= n


class _Connection:
    def __init__(self, cid: int, client_writer: asyncio.StreamWriter) -> None:
        self.cid = cid
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task] = []
        self.bytes = {"up": 0, "down": 0}

    def abort(self) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class LinkEmulator:
    """TCP proxy ``listen`` -> ``upstream`` with shaping and outages. Runs its own event loop thread."""

    def __init__(
        self,
        upstream: tuple[str, int] | str,
        listen: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        up_bps: float | None = None,
        down_bps: float | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        outage_every_s: float = 0.0,
        outage_for_s: float = 0.0,
        outage_mode: str = "drop",
        random_outages_per_min: float = 0.0,
        seed: int | None = None,
        read_chunk: int = 4096,
    ) -> None:
        if outage_mode not in OUTAGE_MODES:
            raise ValueError(f"outage mode must be one of {OUTAGE_MODES}, got {outage_mode!r}")
        if outage_every_s and not outage_for_s:
            raise ValueError("outage_every_s needs outage_for_s")
        self.upstream = _address(upstream)
        self.listen = _address(listen)
        self.up_bps, self.down_bps = up_bps, down_bps
        self.latency_s, self.jitter_s = latency_ms / 1000.0, jitter_ms / 1000.0
        self.outage_every_s, self.outage_for_s, self.outage_mode = outage_every_s, outage_for_s, outage_mode
        self.random_outages_per_min = random_outages_per_min
        self.read_chunk = read_chunk
        self._rng = random.Random(seed)
        self.events: list[dict] = []
        self.stats = {"connections": 0, "refused": 0, "reset": 0, "bytes_up": 0, "bytes_down": 0, "outages": 0}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Connection] = {}
        self._next_cid = 0
        self._down_mode: str | None = None  # None = link up
        self._link_up: asyncio.Event | None = None
        self._background: list[asyncio.Task] = []

    # -- public API (any thread) ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._down_mode is not None

    def start(self) -> LinkEmulator:
        ready = threading.Event()
        errors: list[BaseException] = []

        def _main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=_main, name=f"link-{self.upstream[1]}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def set_down(self, mode: str = "drop", reason: str = "manual") -> None:
        """Take the link down until ``set_up()``."""
        if mode not in OUTAGE_MODES:
            raise ValueError(f"outage mode must be one of {OUTAGE_MODES}")
        self._call(self._go_down, mode, reason)

    def set_up(self) -> None:
        self._call(self._go_up)

    def outage(self, seconds: float, mode: str | None = None) -> None:
        """Take the link down now for ``seconds`` (returns at once)."""
        self._call(lambda: self._background.append(
            asyncio.ensure_future(self._timed_outage(seconds, mode or self.outage_mode, "manual"))))

    def _call(self, fn, *args) -> None:
        if self._loop is None:
            raise RuntimeError("link emulator is not started")
        done = threading.Event()

        def _run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(_run)
        done.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- event loop side -----------------------------------------------------------------------------
    def _event(self, action: str, **details) -> None:
        self.events.append({"t": time.time(), "action": action, **details})
        log.info("link %s -> %s:%d: %s %s", self.address, *self.upstream, action,
                 " ".join(f"{k}={v}" for k, v in details.items()))

    async def _open(self) -> None:
        self._link_up = asyncio.Event()
        self._link_up.set()
        self._buckets = {"up": TokenBucket(self.up_bps), "down": TokenBucket(self.down_bps)}
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]
        if self.outage_every_s:
            self._background.append(asyncio.ensure_future(self._scheduled_outages()))
        if self.random_outages_per_min:
            self._background.append(asyncio.ensure_future(self._random_outages()))
        self._event("listening", up_bps=self.up_bps, down_bps=self.down_bps,
                    latency_ms=self.latency_s * 1000, jitter_ms=self.jitter_s * 1000)

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        for conn in list(self._conns.values()):
            conn.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._event("stopped", **{k: v for k, v in self.stats.items()})

    def _go_down(self, mode: str, reason: str) -> None:
        self._down_mode = mode
        self._link_up.clear()
        self.stats["outages"] += 1
        self._event("down", mode=mode, reason=reason, open_connections=len(self._conns))
        if mode == "drop":
            for conn in list(self._conns.values()):
                conn.abort()
                self.stats["reset"] += 1

    def _go_up(self) -> None:
        if self._down_mode is None:
            return
        self._down_mode = None
        self._link_up.set()
        self._event("up")

    async def _timed_outage(self, seconds: float, mode: str, reason: str) -> None:
        self._go_down(mode, reason)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._go_up()

    async def _scheduled_outages(self) -> None:
        while True:
            await asyncio.sleep(self.outage_every_s)
            await self._timed_outage(self.outage_for_s, self.outage_mode, f"every {self.outage_every_s} s")

    async def _random_outages(self) -> None:
        while True:
            await asyncio.sleep(self._rng.expovariate(self.random_outages_per_min / 60.0))
            seconds = self._rng.uniform(0.5, 1.5) * (self.outage_for_s or 5.0)
            await self._timed_outage(seconds, self.outage_mode, "random")

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._down_mode == "drop":
            self.stats["refused"] += 1
            client_writer.transport.abort()
            return
        self._next_cid += 1
        conn = _Connection(self._next_cid, client_writer)
        self._conns[conn.cid] = conn
        try:
            await self._link_up.wait()  # a stalled link: the connection hangs until it is back
            try:
                upstream_reader, conn.upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                self._event("upstream_refused", conn=conn.cid, error=str(exc))
                client_writer.transport.abort()
                return
            self.stats["connections"] += 1
            self._event("connect", conn=conn.cid, peer=client_writer.get_extra_info("peername"))
            conn.tasks = [
                asyncio.ensure_future(self._pipe(conn, client_reader, conn.upstream_writer, "up")),
                asyncio.ensure_future(self._pipe(conn, upstream_reader, client_writer, "down")),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.pop(conn.cid, None)
            for writer in (client_writer, conn.upstream_writer):
                if writer is not None:
                    writer.close()
            self._event("close", conn=conn.cid, bytes_up=conn.bytes["up"], bytes_down=conn.bytes["down"])

    async def _pipe(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Read, shape, delay and write one direction; EOF is forwarded as a half-close."""
        bucket = self._buckets[direction]
        delay_line: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                deliver_at, data = await delay_line.get()
                wait = deliver_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._link_up.wait()
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        deliverer = asyncio.ensure_future(deliver())
        last_at = 0.0
        try:
            while True:
                data = await reader.read(self.read_chunk)
                if not data:
                    break
                for start in range(0, len(data), bucket.burst):
                    piece = data[start:start + bucket.burst]
                    await self._link_up.wait()
                    await bucket.take(len(piece))
                    jitter = self._rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
                    last_at = max(last_at, loop.time() + max(0.0, self.latency_s + jitter))
                    delay_line.put_nowait((last_at, piece))
                    conn.bytes[direction] += len(piece)
                    self.stats[f"bytes_{direction}"] += len(piece)
            delay_line.put_nowait((max(last_at, loop.time() + self.latency_s), None))
            await deliverer
        except (ConnectionError, OSError):
            conn.abort()  # a reset on one side resets the other, as a dead path would
        finally:
            deliverer.cancel()


def _address(value: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(value, tuple):
        return value[0], int(value[1])
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {value!r} must be HOST:PORT")
    return host, int(port)
