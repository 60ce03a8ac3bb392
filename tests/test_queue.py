"""Durable queue: accepted means on disk, leaves only on a final ack, bounded with counted policies."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mridc.edge.queue import FrameQueue, QueueError
from mridc.v1 import mridc_pb2

ACK = mridc_pb2.FrameAck


def test_put_pending_ack_roundtrip(tmp_path):
    with FrameQueue(tmp_path / "q.db", "cam-01") as q:
        r1 = q.put(b"frame-1", capture_time_us=111, model_id=7, meta={"bpp": "0.02"})
        r2 = q.put(b"frame-2", capture_time_us=222)
        assert (r1.accepted, r1.sequence, r2.sequence) == (True, 1, 2)
        frames = q.pending(limit=10)
        assert [f.sequence for f in frames] == [1, 2]
        env = frames[0].to_envelope()
        assert env.device_id == "cam-01" and env.sequence == 1 and env.capture_time_us == 111
        assert env.content_hash == hashlib.sha256(b"frame-1").digest() and env.model_id == 7
        assert dict(env.meta) == {"bpp": "0.02"}
        assert q.ack(1, ACK.STORED) is True
        assert q.ack(1, ACK.STORED) is False  # a second ack for the same frame is harmless
        assert [f.sequence for f in q.pending()] == [2]
        assert q.stats()["acked_stored"] == 1


def test_retry_later_keeps_and_final_statuses_remove(tmp_path):
    with FrameQueue(tmp_path / "q.db", "cam-01") as q:
        for i in range(4):
            q.put(f"f{i}".encode())
        assert q.ack(1, ACK.RETRY_LATER) is False
        assert q.ack(2, ACK.DUPLICATE) and q.ack(3, ACK.REJECTED) and q.ack(4, ACK.STORED)
        assert [f.sequence for f in q.pending()] == [1]
        s = q.stats()
        assert (s["retry_later"], s["acked_duplicate"], s["acked_rejected"], s["acked_stored"]) == (1, 1, 1, 1)


def test_attempts_count_the_forwarders_sends(tmp_path):
    from mridc.edge.agent import Forwarder

    class Wire:  # connected, accepts every frame, never acks
        connected = True
        on_ack = on_reset = None

        def __init__(self):
            self.sent = []

        def send(self, envelope):
            self.sent.append(envelope.sequence)
            return True

    with FrameQueue(tmp_path / "q.db", "cam-01") as q:
        q.put(b"f1")
        q.put(b"f2")
        forwarder = Forwarder(q, Wire(), window=4, ack_timeout_s=0.0)
        assert forwarder.step() == 2
        assert [f.attempts for f in q.pending()] == [1, 1]
        assert forwarder.step() == 2  # no ack within the (zero) timeout: sent again
        assert [f.attempts for f in q.pending()] == [2, 2]
        assert forwarder.transport.sent == [1, 2, 1, 2] and forwarder.stats["resent"] == 2


def test_sequence_monotonic_across_restarts_even_when_empty(tmp_path):
    path = tmp_path / "q.db"
    with FrameQueue(path, "cam-01") as q:
        for _ in range(3):
            q.put(b"x")
        for seq in (1, 2, 3):
            q.ack(seq, ACK.STORED)
        assert len(q) == 0
    with FrameQueue(path, "cam-01") as q:
        assert q.put(b"y").sequence == 4


def test_queue_belongs_to_one_device(tmp_path):
    FrameQueue(tmp_path / "q.db", "cam-01").close()
    with pytest.raises(QueueError, match="belongs to device 'cam-01'"):
        FrameQueue(tmp_path / "q.db", "cam-02")


def test_drop_oldest_is_counted(tmp_path):
    with FrameQueue(tmp_path / "q.db", "cam-01", max_frames=3, policy="drop_oldest") as q:
        results = [q.put(f"f{i}".encode()) for i in range(5)]
        assert all(r.accepted for r in results)
        assert results[3].dropped == (1,) and results[4].dropped == (2,)
        assert [f.sequence for f in q.pending()] == [3, 4, 5]
        assert q.stats()["dropped_oldest"] == 2


def test_drop_newest_refuses_without_using_a_sequence(tmp_path):
    with FrameQueue(tmp_path / "q.db", "cam-01", max_frames=2, policy="drop_newest") as q:
        assert q.put(b"a").accepted and q.put(b"b").accepted
        refused = q.put(b"c")
        assert not refused.accepted and refused.sequence is None and "full" in refused.reason
        q.ack(1, ACK.STORED)
        assert q.put(b"d").sequence == 3
        assert q.stats()["dropped_newest"] == 1


def test_byte_bound_and_lower_bpp_signal(tmp_path):
    with FrameQueue(tmp_path / "q.db", "cam-01", max_frames=100, max_bytes=1000, policy="lower_bpp",
                    pressure_watermark=0.5) as q:
        assert not q.put(b"x" * 300).lower_bpp
        assert q.put(b"x" * 300).lower_bpp  # 600/1000 >= 0.5
        r = q.put(b"x" * 500)  # over the byte bound: lower_bpp falls back to dropping the oldest
        assert r.accepted and r.dropped == (1,) and r.lower_bpp
        assert q.stats()["bytes"] == 800
        oversized = q.put(b"x" * 2000)
        assert not oversized.accepted and "max_bytes" in oversized.reason


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "ack", "retry", "reopen"]), st.integers(0, 20)), max_size=40))
def test_sequences_strictly_increase_and_acked_never_return(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("hq") / "q.db"
    q = FrameQueue(path, "cam-01", max_frames=5)
    issued, acked = [], set()
    try:
        for op, n in ops:
            if op == "put":
                issued.append(q.put(bytes([n])).sequence)
            elif op == "ack" and issued:
                seq = issued[n % len(issued)]
                q.ack(seq, ACK.STORED)
                acked.add(seq)
            elif op == "retry" and issued:
                q.ack(issued[n % len(issued)], ACK.RETRY_LATER)
            elif op == "reopen":
                q.close()
                q = FrameQueue(path, "cam-01", max_frames=5)
        assert issued == sorted(set(issued))
        pending = [f.sequence for f in q.pending(limit=100)]
        assert not set(pending) & acked
        assert len(pending) <= 5
    finally:
        q.close()


_WRITER = textwrap.dedent(
    """
    import os, sys
    from mridc.edge.queue import FrameQueue
    q = FrameQueue(sys.argv[1], "cam-01")
    i = 0
    while True:
        data = os.urandom(200 + i % 300)
        r = q.put(data, capture_time_us=i)
        print(r.sequence, data.hex(), flush=True)   # reported only after put() returned: accepted
        i += 1
    """
)


@pytest.mark.timeout(60)
def test_survives_kill_9_mid_stream(tmp_path):
    """Every frame the writer saw accepted is on disk after SIGKILL, intact; sequences continue."""
    path = tmp_path / "q.db"
    accepted: dict[int, bytes] = {}
    for _round in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        target = len(accepted) + 150
        while len(accepted) < target:
            seq, hexdata = proc.stdout.readline().split()
            accepted[int(seq)] = bytes.fromhex(hexdata)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with FrameQueue(path, "cam-01") as q:
        stored = {f.sequence: f for f in q.pending(limit=100_000)}
        for seq, data in accepted.items():
            assert seq in stored, f"accepted frame {seq} lost after kill -9"
            assert stored[seq].bitstream == data
            assert stored[seq].content_hash == hashlib.sha256(data).digest()
        assert sorted(stored) == list(range(1, len(stored) + 1))  # no gaps, no reuse across restarts
        assert q.next_sequence == max(stored) + 1
