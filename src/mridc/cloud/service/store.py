"""Durable output store: one PNG + JSON sidecar per frame, and a SQLite index shared by all workers.

The index is what makes delivery exactly-once in effect. A frame moves through two states:
- `claimed`: one worker instance is decoding it. Another instance that receives the same frame (a broker
  redelivery, or the same frame over gRPC) answers "busy" while the claimant is alive, and takes the claim
  over when the claimant is dead.
- `stored`: PNG and sidecar are on disk. Any later copy is a duplicate: acknowledged, never decoded again.
Files are written (temp file + rename) before the row turns `stored`, so a stored row always has its files.

Liveness: an instance is alive while its heartbeat is fresh and, on this machine (same host, boot and PID
namespace), while its process exists and is not a zombie, so a `kill -9` is seen at once. A worker id may
be held by one live instance only: a second live process under the same id is refused at start-up, since
it would share an MQTT client id and make the other's claims look orphaned. Storing checks the claim once
more, so even a claim taken over from a frozen owner stores once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CLAIMED, DUPLICATE, BUSY = "claimed", "duplicate", "busy"
FINAL, PREVIEW, REFINED = "final", "preview", "refined"  # picture stages

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    device_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    claimed_at REAL,
    capture_time_us INTEGER,
    stored_at REAL,
    png_path TEXT,
    sidecar_path TEXT,
    bytes INTEGER,
    bpp REAL,
    width INTEGER,
    height INTEGER,
    model_id INTEGER,
    transport TEXT,
    worker_id TEXT,
    stage TEXT,
    refine_owner TEXT,
    refined_at REAL,
    slices_held INTEGER,
    slice_count INTEGER,
    PRIMARY KEY (device_id, sequence)
);
CREATE INDEX IF NOT EXISTS frames_by_time ON frames (device_id, capture_time_us);
CREATE TABLE IF NOT EXISTS reference_grids (
    device_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    grid BLOB NOT NULL,
    PRIMARY KEY (device_id, sequence)
);
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    pid INTEGER,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    machine TEXT
);
"""


class WorkerIdInUse(RuntimeError):
    """Another live instance holds this worker id (and with it the MQTT client id)."""


class ClaimLost(RuntimeError):
    """The frame was stored, or its claim taken over, while this instance decoded it."""


def machine_key() -> str:
    """Where a PID means the same process: host name, kernel boot and PID namespace."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the host name alone
        pass
    return "|".join(parts)


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a killed child its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class StoredFrame:
    device_id: str
    sequence: int
    capture_time_us: int
    width: int
    height: int
    bytes: int
    bpp: float
    model_id: int
    transport: str
    worker_id: str
    decode: dict = field(default_factory=dict)  # realism, seed, steps, decoder
    timings: dict = field(default_factory=dict)  # seconds: queue, decode, store, end_to_end ...
    content_sha256: str = ""
    stored_at: float = 0.0
    png_path: str = ""
    sidecar_path: str = ""
    # "final" (one decode), or "preview" then "refined" (progressive delivery). `png_path` always holds the
    # latest; `versions` maps each stage to its own PNG, decode settings and time.
    stage: str = FINAL
    versions: dict = field(default_factory=dict)
    bitstream_path: str = ""  # the MRD stream as received, kept so that a refinement can run anywhere later
    # A frame that came as slices over a datagram link: {"held": [slice indexes decoded], "count": n}. Empty
    # for a frame that came whole. A later version with more slices replaces the picture (`versions.updates`).
    slices: dict = field(default_factory=dict)


def frame_basename(device_id: str, sequence: int) -> str:
    return f"{device_id}_{sequence:012d}"


class FrameStore:
    """Thread-safe within a process; several processes may share one out_dir (SQLite WAL + busy timeout)."""

    def __init__(self, out_dir: str | Path, *, dead_after_s: float = 15.0):
        self.out_dir = Path(out_dir)
        self.frames_dir = self.out_dir / "frames"
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        self.dead_after_s = dead_after_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.out_dir / "index.sqlite", timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self.machine = machine_key()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(instances)")}
            if "machine" not in columns:  # an index written before instances recorded their machine
                self._db.execute("ALTER TABLE instances ADD COLUMN machine TEXT")
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(frames)")}
            for name, kind in (("stage", "TEXT"), ("refine_owner", "TEXT"), ("refined_at", "REAL"),
                               ("slices_held", "INTEGER"), ("slice_count", "INTEGER")):
                if name not in columns:  # an index from before progressive delivery: its frames are final
                    self._db.execute(f"ALTER TABLE frames ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self):
        """The lock and one IMMEDIATE transaction: committed on success, rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- worker instances --------------------------------------------------------------------------------
    def register_instance(self, instance: str, worker_id: str, pid: int | None = None) -> None:
        """Record a starting instance; WorkerIdInUse when a live instance already holds `worker_id`."""
        now = time.time()
        with self._transaction():
            holders = self._db.execute("SELECT instance, pid, machine FROM instances WHERE worker_id = ? "
                                       "AND instance != ?", (worker_id, instance)).fetchall()
            for row in holders:
                if self._owner_alive(row["instance"], now):
                    where = "this machine" if row["machine"] == self.machine else "another machine"
                    raise WorkerIdInUse(
                        f"worker id {worker_id!r} is in use by a live instance (pid {row['pid']} on {where}); "
                        "give every serve process its own --worker-id, or leave it unset for a unique one")
            self._db.execute("INSERT OR REPLACE INTO instances (instance, worker_id, pid, started_at, "
                             "last_seen, machine) VALUES (?, ?, ?, ?, ?, ?)",
                             (instance, worker_id, os.getpid() if pid is None else pid, now, now, self.machine))

    def heartbeat(self, instance: str) -> None:
        with self._lock:
            self._db.execute("UPDATE instances SET last_seen = ? WHERE instance = ?", (time.time(), instance))

    def _owner_alive(self, owner: str, now: float) -> bool:
        row = self._db.execute("SELECT worker_id, pid, started_at, last_seen, machine FROM instances "
                               "WHERE instance = ?", (owner,)).fetchone()
        if row is None or now - row["last_seen"] > self.dead_after_s:
            return False
        if row["machine"] == self.machine and row["pid"] is not None and not process_alive(row["pid"]):
            return False
        # A newer instance in the same worker slot means this one was restarted: its claims are orphans.
        # (Safe because register_instance refuses a worker id that a live instance holds.)
        newer = self._db.execute("SELECT 1 FROM instances WHERE worker_id = ? AND started_at > ? LIMIT 1",
                                 (row["worker_id"], row["started_at"])).fetchone()
        return newer is None

    # -- claims ------------------------------------------------------------------------------------------
    def claim(self, device_id: str, sequence: int, instance: str) -> str:
        """CLAIMED (decode it), DUPLICATE (already stored) or BUSY (a live instance is decoding it)."""
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT state, owner FROM frames WHERE device_id = ? AND sequence = ?",
                                   (device_id, sequence)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO frames (device_id, sequence, state, owner, claimed_at) "
                                 "VALUES (?, ?, 'claimed', ?, ?)", (device_id, sequence, instance, now))
                result = CLAIMED
            elif row["state"] == "stored":
                result = DUPLICATE
            elif row["owner"] != instance and self._owner_alive(row["owner"], now):
                result = BUSY
            else:
                self._db.execute("UPDATE frames SET owner = ?, claimed_at = ? WHERE device_id = ? "
                                 "AND sequence = ?", (instance, now, device_id, sequence))
                result = CLAIMED
        return result

    def release(self, device_id: str, sequence: int, instance: str) -> None:
        """Drop a claim that will not be completed (the frame was rejected after claiming)."""
        with self._lock:
            self._db.execute("DELETE FROM frames WHERE device_id = ? AND sequence = ? AND state = 'claimed' "
                             "AND owner = ?", (device_id, sequence, instance))

    # -- results -----------------------------------------------------------------------------------------
    def paths_for(self, device_id: str, sequence: int) -> tuple[Path, Path]:
        base = self.frames_dir / device_id / frame_basename(device_id, sequence)
        return base.with_suffix(".png"), base.with_suffix(".json")

    def owns_claim(self, device_id: str, sequence: int, instance: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT state, owner FROM frames WHERE device_id = ? AND sequence = ?",
                                   (device_id, sequence)).fetchone()
        return row is not None and row["state"] == "claimed" and row["owner"] == instance

    def put(self, record: StoredFrame, image: np.ndarray | None = None, png: bytes | None = None,
            instance: str | None = None, bitstream: bytes | None = None, update: bool = False) -> StoredFrame:
        """Write PNG (+ the MRD stream) and sidecar, then mark the index row stored. With `instance`, only
        while that instance still holds the claim (else ClaimLost: another worker stored it or took the claim
        over). A `preview` record also keeps its PNG as `NAME.preview.png`, which its refinement leaves alone.

        `update`: replace a stored frame that was decoded from fewer slices (`record.slices` holds more); no
        claim is involved, and ClaimLost when the stored version already holds as many slices."""
        png = png if png is not None else encode_png(image)
        if update:
            return self._put_update(record, png, bitstream)
        if instance is not None and not self.owns_claim(record.device_id, record.sequence, instance):
            raise ClaimLost(f"{record.device_id}/{record.sequence}: claim no longer held by {instance}")
        self._write_files(record, png, bitstream)
        with self._transaction():
            if instance is not None:
                row = self._db.execute("SELECT state, owner FROM frames WHERE device_id = ? AND sequence = ?",
                                       (record.device_id, record.sequence)).fetchone()
                if row is None or row["state"] != "claimed" or row["owner"] != instance:
                    raise ClaimLost(f"{record.device_id}/{record.sequence}: stored or taken over meanwhile")
            self._write_stored_row(record)
        return record

    def _put_update(self, record: StoredFrame, png: bytes, bitstream: bytes | None) -> StoredFrame:
        held = len(record.slices.get("held", ()))
        # Files are written inside the transaction: its write lock (across processes) keeps two updaters of
        # one frame from interleaving their files, and the most complete version wins.
        with self._transaction():
            row = self._db.execute("SELECT state, slices_held FROM frames WHERE device_id = ? AND sequence = ?",
                                   (record.device_id, record.sequence)).fetchone()
            if row is None or row["state"] != "stored":
                raise ClaimLost(f"{record.device_id}/{record.sequence}: not stored, nothing to update")
            if row["slices_held"] is None or row["slices_held"] >= held:
                raise ClaimLost(f"{record.device_id}/{record.sequence}: the stored version holds as many slices")
            old = self.load_record(record.device_id, record.sequence)
            history = list(old.versions.get("updates", ()))
            history.append({"slices_held": len(old.slices.get("held", ())), "content_sha256": old.content_sha256,
                            "bytes": old.bytes, "stored_at": old.stored_at, "worker_id": old.worker_id})
            record.versions = {"updates": history}
            self._write_files(record, png, bitstream)
            self._write_stored_row(record)
        return record

    def stored_slices(self, device_id: str, sequence: int) -> tuple[int, int] | None:
        """(slices held, slice count) of a stored frame, (1, 1) for one that came whole; None if not stored."""
        with self._lock:
            row = self._db.execute("SELECT state, slices_held, slice_count FROM frames WHERE device_id = ? AND "
                                   "sequence = ?", (device_id, sequence)).fetchone()
        if row is None or row["state"] != "stored":
            return None
        return (1, 1) if row["slices_held"] is None else (int(row["slices_held"]), int(row["slice_count"]))

    def _write_files(self, record: StoredFrame, png: bytes, bitstream: bytes | None) -> None:
        png_path, sidecar_path = self.paths_for(record.device_id, record.sequence)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        if bitstream is not None:
            mrd_path = png_path.with_suffix(".mrd")
            _atomic_write(mrd_path, bitstream)
            record.bitstream_path = str(mrd_path.relative_to(self.out_dir))
        record.stored_at = time.time()
        if record.stage == PREVIEW:
            preview_path = png_path.with_suffix(".preview.png")
            _atomic_write(preview_path, png)
            record.versions[PREVIEW] = {"png_path": str(preview_path.relative_to(self.out_dir)),
                                        "stored_at": record.stored_at, "decode": dict(record.decode)}
        _atomic_write(png_path, png)
        record.png_path = str(png_path.relative_to(self.out_dir))
        record.sidecar_path = str(sidecar_path.relative_to(self.out_dir))
        _atomic_write(sidecar_path, (json.dumps(sidecar_dict(record), indent=2) + "\n").encode())

    # -- progressive delivery: refinement of stored previews -------------------------------------------
    def claim_refinement(self, instance: str, limit: int = 1) -> list[tuple[str, int]]:
        """Take up to `limit` previews to refine, oldest capture first: unowned ones, and those of dead owners."""
        now = time.time()
        with self._transaction():
            rows = self._db.execute(
                "SELECT device_id, sequence, refine_owner FROM frames WHERE state = 'stored' AND stage = ? "
                "ORDER BY (refine_owner IS NOT NULL), capture_time_us LIMIT ?", (PREVIEW, 8 * limit)).fetchall()
            taken = []
            for row in rows:
                owner = row["refine_owner"]
                if owner is not None and owner != instance and self._owner_alive(owner, now):
                    continue
                self._db.execute("UPDATE frames SET refine_owner = ? WHERE device_id = ? AND sequence = ?",
                                 (instance, row["device_id"], row["sequence"]))
                taken.append((row["device_id"], int(row["sequence"])))
                if len(taken) >= limit:
                    break
        return taken

    def release_refinement(self, device_id: str, sequence: int, instance: str) -> None:
        with self._lock:
            self._db.execute("UPDATE frames SET refine_owner = NULL WHERE device_id = ? AND sequence = ? AND "
                             "refine_owner = ?", (device_id, sequence, instance))

    def abandon_refinement(self, device_id: str, sequence: int, instance: str, reason: str) -> None:
        """A preview that cannot be refined (its stream is gone or no longer decodes) becomes final."""
        record = self.load_record(device_id, sequence)
        record.stage = FINAL
        record.versions.setdefault(PREVIEW, {})["refinement_abandoned"] = reason
        _, sidecar_path = self.paths_for(device_id, sequence)
        _atomic_write(sidecar_path, (json.dumps(sidecar_dict(record), indent=2) + "\n").encode())
        with self._lock:
            self._db.execute("UPDATE frames SET stage = ?, refine_owner = NULL WHERE device_id = ? AND sequence = ? "
                             "AND refine_owner = ?", (FINAL, device_id, sequence, instance))

    def load_record(self, device_id: str, sequence: int) -> StoredFrame:
        _, sidecar_path = self.paths_for(device_id, sequence)
        data = json.loads(sidecar_path.read_text())
        known = {f.name for f in dataclasses.fields(StoredFrame)}
        return StoredFrame(**{k: v for k, v in data.items() if k in known})

    def load_bitstream(self, device_id: str, sequence: int) -> bytes:
        return self.paths_for(device_id, sequence)[0].with_suffix(".mrd").read_bytes()

    def put_refined(self, device_id: str, sequence: int, instance: str, png: bytes, decode: dict) -> StoredFrame:
        """Replace a preview's picture with its refinement (only while `instance` holds the refinement). The
        check and the writes share one transaction, so a refinement of a version that a late-slice update
        replaced meanwhile writes nothing."""
        png_path, sidecar_path = self.paths_for(device_id, sequence)
        with self._transaction():
            row = self._db.execute("SELECT stage, refine_owner FROM frames WHERE device_id = ? AND sequence = ?",
                                   (device_id, sequence)).fetchone()
            if row is None or row["stage"] != PREVIEW or row["refine_owner"] != instance:
                raise ClaimLost(f"{device_id}/{sequence}: refinement no longer held by {instance}")
            record = self.load_record(device_id, sequence)
            _atomic_write(png_path, png)
            now = time.time()
            record.stage = REFINED
            record.versions[REFINED] = {"png_path": record.png_path, "stored_at": now, "decode": dict(decode)}
            _atomic_write(sidecar_path, (json.dumps(sidecar_dict(record), indent=2) + "\n").encode())
            self._db.execute("UPDATE frames SET stage = ?, refined_at = ?, refine_owner = NULL WHERE device_id = ? "
                             "AND sequence = ?", (REFINED, now, device_id, sequence))
        return record

    def refinement_backlog(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM frames WHERE state = 'stored' AND stage = ?",
                                    (PREVIEW,)).fetchone()[0]

    def _write_stored_row(self, record: StoredFrame) -> None:
        self._db.execute(
            "INSERT INTO frames (device_id, sequence, state, owner, capture_time_us, stored_at, png_path, "
            "sidecar_path, bytes, bpp, width, height, model_id, transport, worker_id, stage, slices_held, "
            "slice_count) VALUES (?, ?, 'stored', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id, sequence) DO UPDATE SET state = 'stored', owner = NULL, "
            "capture_time_us = excluded.capture_time_us, stored_at = excluded.stored_at, "
            "png_path = excluded.png_path, sidecar_path = excluded.sidecar_path, bytes = excluded.bytes, "
            "bpp = excluded.bpp, width = excluded.width, height = excluded.height, "
            "model_id = excluded.model_id, transport = excluded.transport, worker_id = excluded.worker_id, "
            "stage = excluded.stage, slices_held = excluded.slices_held, slice_count = excluded.slice_count, "
            "refine_owner = NULL, refined_at = NULL",
            (record.device_id, record.sequence, record.capture_time_us, record.stored_at, record.png_path,
             record.sidecar_path, record.bytes, record.bpp, record.width, record.height, record.model_id,
             record.transport, record.worker_id, record.stage,
             len(record.slices["held"]) if record.slices else None, record.slices.get("count")))

    # -- inter frames: what each frame left in the cloud's token grid --------------------------------------
    def put_reference(self, device_id: str, sequence: int, grid, keep: int = 64) -> None:
        """Keep a frame's ReferenceGrid (durable, shared by the workers); only the newest `keep` per device."""
        blob = encode_grid(grid)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO reference_grids (device_id, sequence, grid) VALUES (?, ?, ?)",
                             (device_id, sequence, blob))
            self._db.execute("DELETE FROM reference_grids WHERE device_id = ? AND sequence <= (SELECT sequence "
                             "FROM reference_grids WHERE device_id = ? ORDER BY sequence DESC LIMIT 1 OFFSET ?)",
                             (device_id, device_id, keep))

    def get_reference(self, device_id: str, sequence: int):
        with self._lock:
            row = self._db.execute("SELECT grid FROM reference_grids WHERE device_id = ? AND sequence = ?",
                                   (device_id, sequence)).fetchone()
        return None if row is None else decode_grid(bytes(row["grid"]))

    @property
    def references(self) -> ReferenceMap:
        """The reference grids as a mapping {(device, sequence): ReferenceGrid} (mridc.cloud.sequence)."""
        return ReferenceMap(self)

    def is_stored(self, device_id: str, sequence: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT state FROM frames WHERE device_id = ? AND sequence = ?",
                                   (device_id, sequence)).fetchone()
        return row is not None and row["state"] == "stored"

    def query(self, device_id: str | None = None, since_us: int | None = None, until_us: int | None = None,
              limit: int | None = None) -> list[dict]:
        """Stored frames, oldest capture first. Times are capture times in UNIX microseconds."""
        sql = "SELECT * FROM frames WHERE state = 'stored'"
        params: list = []
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        if since_us is not None:
            sql += " AND capture_time_us >= ?"
            params.append(since_us)
        if until_us is not None:
            sql += " AND capture_time_us < ?"
            params.append(until_us)
        sql += " ORDER BY capture_time_us, device_id, sequence"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        hidden = ("state", "owner", "claimed_at", "refine_owner")
        return [{k: row[k] for k in row.keys() if k not in hidden} for row in rows]  # noqa: SIM118 (sqlite3.Row)

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM frames WHERE state = 'stored'").fetchone()[0]


class ReferenceMap:
    """`FrameStore` reference grids behind the mapping interface `SequenceFrames` takes."""

    def __init__(self, store: FrameStore) -> None:
        self.store = store

    def get(self, key: tuple[str, int], default=None):
        grid = self.store.get_reference(*key)
        return default if grid is None else grid

    def __getitem__(self, key: tuple[str, int]):
        grid = self.store.get_reference(*key)
        if grid is None:
            raise KeyError(key)
        return grid

    def __setitem__(self, key: tuple[str, int], grid) -> None:
        self.store.put_reference(key[0], key[1], grid)

    def __contains__(self, key) -> bool:
        return self.store.get_reference(*key) is not None


def encode_grid(grid) -> bytes:
    """A ReferenceGrid as bytes: h u16 | w u16 | packed known bits | known tokens u16le (its crc() form)."""
    h, w = grid.shape
    return (h.to_bytes(2, "big") + w.to_bytes(2, "big") + np.packbits(grid.known.reshape(-1)).tobytes()
            + grid.tokens[grid.known].astype("<u2").tobytes())


def decode_grid(data: bytes):
    from mridc.shared.inter import ReferenceGrid

    h, w = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
    n_bits = (h * w + 7) // 8
    known = np.unpackbits(np.frombuffer(data[4:4 + n_bits], np.uint8))[: h * w].astype(bool).reshape(h, w)
    tokens = np.zeros((h, w), np.int64)
    tokens[known] = np.frombuffer(data[4 + n_bits:], "<u2")
    return ReferenceGrid(tokens, known)


def encode_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file + rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sidecar_dict(record: StoredFrame) -> dict:
    data = asdict(record)
    data["capture_time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.capture_time_us / 1e6)) + (
        f".{record.capture_time_us % 1_000_000:06d}Z")
    data["bits"] = record.bytes * 8
    return data


def open_store_readonly(out_dir: str | Path) -> FrameStore:
    """For `mridc-cloud frames`: refuses to create an index where none exists."""
    if not (Path(out_dir) / "index.sqlite").exists():
        raise FileNotFoundError(f"no frame index in {out_dir} (expected {Path(out_dir) / 'index.sqlite'})")
    return FrameStore(out_dir)
