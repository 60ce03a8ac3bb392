"""Durable store-and-forward frame queue on local disk (SQLite in WAL mode).

A frame is *accepted* only once its row is committed with ``synchronous=FULL``, so it survives
``kill -9`` and power loss. It leaves the queue only when the cloud acknowledges it
(STORED, DUPLICATE or REJECTED); RETRY_LATER keeps it for a later resend. An inter frame is stored with its
intra ``fallback`` (the same token grid coded alone): NEED_INTRA (the cloud lacks its reference) swaps it in,
so the frame is sent again intra and nothing is lost.

A calibration still (scene adaptation) is queued the same way, with ``kind = "calibration"`` and a lower
priority: ``pending`` hands out every live frame before any calibration frame, so calibration never delays
a live frame in the queue.

Sequence numbers are allocated in the same transaction as the insert and persisted in the
``meta`` table, so they stay strictly increasing across restarts even when the queue is empty.

When the queue is full, the configured policy decides, and every drop is counted:

- ``drop_oldest``: the oldest queued frames are deleted to make room for the new one (calibration stills
  before any live frame);
- ``drop_newest``: the new frame is refused (no sequence number is used);
- ``lower_bpp``: above ``pressure_watermark`` the result asks the producer to lower its bit rate;
  when completely full it behaves like ``drop_oldest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mridc.shared.protocol import AckStatus, build_calibration, build_envelope, is_final
from mridc.v1 import mridc_pb2

POLICIES = ("drop_oldest", "drop_newest", "lower_bpp")

_COUNTERS = (
    "accepted",
    "acked_stored",
    "acked_duplicate",
    "acked_rejected",
    "retry_later",
    "dropped_oldest",
    "dropped_newest",
    "bytes_accepted",
    "need_intra",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    sequence INTEGER PRIMARY KEY,
    capture_time_us INTEGER NOT NULL,
    bitstream BLOB NOT NULL,
    content_hash BLOB NOT NULL,
    model_id INTEGER NOT NULL,
    meta_json TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    fallback BLOB,
    kind TEXT NOT NULL DEFAULT 'frame',
    priority INTEGER NOT NULL DEFAULT 0
);
"""

FRAME, CALIBRATION = "frame", "calibration"
PRIORITY = {FRAME: 0, CALIBRATION: 1}  # lower goes first


class QueueError(RuntimeError):
    """The queue file is unusable or belongs to another device."""


@dataclass(frozen=True)
class QueuedFrame:
    """One frame as stored in the queue: everything the cloud needs to dedupe and decode it."""

    device_id: str
    sequence: int
    capture_time_us: int
    bitstream: bytes
    content_hash: bytes
    model_id: int
    meta: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    kind: str = FRAME  # or CALIBRATION: `bitstream` then holds the still's image file

    def to_envelope(self) -> mridc_pb2.FrameEnvelope:
        return build_envelope(self.device_id, self.sequence, self.bitstream, self.model_id,
                              capture_time_us=self.capture_time_us, content_hash=self.content_hash, meta=self.meta)

    def to_calibration(self) -> mridc_pb2.CalibrationFrame:
        return build_calibration(self.device_id, self.sequence, self.bitstream, self.meta.get("format", "jpeg"),
                                 int(self.meta.get("width", 0)), int(self.meta.get("height", 0)), self.model_id,
                                 capture_time_us=self.capture_time_us, reason=self.meta.get("reason", "schedule"))


@dataclass(frozen=True)
class PutResult:
    """What happened to one ``put``: accepted (with its sequence) or refused, and what was dropped."""

    accepted: bool
    sequence: int | None
    dropped: tuple[int, ...] = ()  # sequences deleted by drop_oldest to make room
    lower_bpp: bool = False  # the producer should lower its bit rate (policy lower_bpp)
    reason: str = ""


class FrameQueue:
    """Bounded, durable, thread-safe FIFO of encoded frames for one device.

    >>> q = FrameQueue("/var/lib/mridc/queue.db", device_id="cam-01", max_frames=1000)
    >>> r = q.put(bitstream, capture_time_us=..., model_id=...)   # durable once it returns accepted
    >>> for frame in q.pending(limit=8): transport.send(frame.to_envelope())
    >>> q.ack(sequence, mridc_pb2.FrameAck.STORED)                # frame leaves the queue
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device_id: str,
        *,
        max_frames: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        policy: str = "drop_oldest",
        pressure_watermark: float = 0.8,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"queue policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("queue max_frames and max_bytes must be >= 1")
        self.path = Path(path)
        self.device_id = device_id
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.policy = policy
        self.pressure_watermark = pressure_watermark
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an accepted frame survives power loss.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
        if "fallback" not in columns:  # a queue written before inter frames
            self._db.execute("ALTER TABLE frames ADD COLUMN fallback BLOB")
        if "kind" not in columns:  # a queue written before calibration frames
            self._db.execute("ALTER TABLE frames ADD COLUMN kind TEXT NOT NULL DEFAULT 'frame'")
            self._db.execute("ALTER TABLE frames ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        with self._tx():
            stored_id = self._meta_get("device_id")
            if stored_id is None:
                self._meta_set("device_id", device_id)
                self._meta_set("next_sequence", "1")
            elif stored_id != device_id:
                raise QueueError(
                    f"queue {self.path} belongs to device {stored_id!r}, not {device_id!r}; "
                    "use one queue file per device"
                )

    # -- internals -------------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self._db, self._lock)

    def _meta_get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _meta_set(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _bump(self, counter: str, by: int = 1) -> None:
        current = int(self._meta_get(f"count.{counter}") or 0)
        self._meta_set(f"count.{counter}", str(current + by))

    def _depth(self) -> tuple[int, int]:
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(bitstream)), 0) FROM frames").fetchone()
        return int(count), int(size)

    # -- producer side ---------------------------------------------------------------------------
    def put(
        self,
        bitstream: bytes,
        *,
        capture_time_us: int | None = None,
        model_id: int = 0,
        meta: dict[str, str] | None = None,
        fallback: bytes | None = None,
        kind: str = FRAME,
    ) -> PutResult:
        """Store one encoded frame; returns only after it is durable (or refused by policy). `fallback`: an
        inter frame's intra version, sent instead if the cloud answers NEED_INTRA. `kind` CALIBRATION: a
        calibration still (its image file as `bitstream`, format/width/height/reason in `meta`)."""
        if kind not in PRIORITY:
            raise ValueError(f"queue kind must be one of {tuple(PRIORITY)}, got {kind!r}")
        bitstream = bytes(bitstream)
        if len(bitstream) > self.max_bytes:
            with self._tx():
                self._bump("dropped_newest")
            return PutResult(False, None, reason=f"frame of {len(bitstream)} B exceeds max_bytes")
        if capture_time_us is None:
            capture_time_us = time.time_ns() // 1000
        content_hash = hashlib.sha256(bitstream).digest()
        dropped: list[int] = []
        with self._tx():
            count, size = self._depth()
            full = count + 1 > self.max_frames or size + len(bitstream) > self.max_bytes
            if full and self.policy == "drop_newest":
                self._bump("dropped_newest")
                return PutResult(False, None, reason="queue full (policy drop_newest)")
            while count + 1 > self.max_frames or size + len(bitstream) > self.max_bytes:
                seq, length = self._db.execute(
                    # calibration stills go first: a live frame is worth more than a still of the same scene
                    "SELECT sequence, LENGTH(bitstream) FROM frames ORDER BY priority DESC, sequence LIMIT 1"
                ).fetchone()
                self._db.execute("DELETE FROM frames WHERE sequence = ?", (seq,))
                dropped.append(int(seq))
                count, size = count - 1, size - int(length)
            if dropped:
                self._bump("dropped_oldest", len(dropped))
            sequence = int(self._meta_get("next_sequence"))
            self._meta_set("next_sequence", str(sequence + 1))
            self._db.execute(
                "INSERT INTO frames (sequence, capture_time_us, bitstream, content_hash, model_id, meta_json,"
                " enqueued_at, fallback, kind, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, int(capture_time_us), bitstream, content_hash, int(model_id),
                 json.dumps(meta or {}, sort_keys=True), time.time(), None if fallback is None else bytes(fallback),
                 kind, PRIORITY[kind]),
            )
            self._bump("accepted")
            self._bump("bytes_accepted", len(bitstream))
            fill = max((count + 1) / self.max_frames, (size + len(bitstream)) / self.max_bytes)
        lower = self.policy == "lower_bpp" and fill >= self.pressure_watermark
        return PutResult(True, sequence, tuple(dropped), lower_bpp=lower)

    # -- consumer side ---------------------------------------------------------------------------
    def pending(self, limit: int = 16, after: int = 0,
                exclude: set[int] | frozenset[int] = frozenset()) -> list[QueuedFrame]:
        """Oldest queued frames (sequence > ``after``), skipping sequences in ``exclude``: every live frame
        before any calibration frame."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, capture_time_us, bitstream, content_hash, model_id, meta_json, attempts, kind"
                " FROM frames WHERE sequence > ? ORDER BY priority, sequence LIMIT ?",
                (after, limit + len(exclude)),
            ).fetchall()
        frames = [
            QueuedFrame(self.device_id, int(r[0]), int(r[1]), bytes(r[2]), bytes(r[3]), int(r[4]),
                        json.loads(r[5]), int(r[6]), r[7])
            for r in rows
            if int(r[0]) not in exclude
        ]
        return frames[:limit]

    def mark_sent(self, sequence: int) -> None:
        """Count one send of the frame (its ``attempts``); the forwarder calls it after each send."""
        with self._tx():
            self._db.execute("UPDATE frames SET attempts = attempts + 1 WHERE sequence = ?", (sequence,))

    def use_fallback(self, sequence: int) -> bool:
        """NEED_INTRA: replace the frame's inter stream by its intra fallback (durably). False when it has none."""
        with self._tx():
            row = self._db.execute("SELECT fallback, meta_json FROM frames WHERE sequence = ?", (sequence,)).fetchone()
            if row is None or row[0] is None:
                return False
            meta = json.loads(row[1]) | {"kind": "intra", "fallback": "1"}
            meta.pop("ref", None)
            self._db.execute("UPDATE frames SET bitstream = fallback, content_hash = ?, fallback = NULL, meta_json = ? "
                             "WHERE sequence = ?", (hashlib.sha256(bytes(row[0])).digest(),
                                                    json.dumps(meta, sort_keys=True), sequence))
            self._bump("need_intra")
            return True

    def ack(self, sequence: int, status: int) -> bool:
        """Apply a cloud ack. Returns True if the frame left the queue (False: kept or unknown)."""
        with self._tx():
            if is_final(status):  # the frame leaves the queue
                removed = self._db.execute("DELETE FROM frames WHERE sequence = ?", (sequence,)).rowcount
                if removed:
                    self._bump(f"acked_{AckStatus(status).name.lower()}")
                return bool(removed)
            if status == AckStatus.RETRY_LATER:
                self._bump("retry_later")
            return False

    # -- reporting -------------------------------------------------------------------------------
    @property
    def next_sequence(self) -> int:
        with self._lock:
            return int(self._meta_get("next_sequence"))

    def __len__(self) -> int:
        with self._lock:
            return self._depth()[0]

    def stats(self) -> dict:
        """Depth, bytes, fill and every counter since the queue file was created."""
        with self._lock:
            count, size = self._depth()
            counters = {name: int(self._meta_get(f"count.{name}") or 0) for name in _COUNTERS}
            next_seq = int(self._meta_get("next_sequence"))
        return {
            "device_id": self.device_id,
            "policy": self.policy,
            "depth": count,
            "bytes": size,
            "fill": round(max(count / self.max_frames, size / self.max_bytes), 4),
            "next_sequence": next_seq,
            **counters,
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the queue's lock (rolls back on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self):
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb):
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
