"""The CoAP datagram path: slices over lossy UDP through the link emulator, into the real decode service.

Real sockets on 127.0.0.1 only: aiocoap on both sides, `mridc.lab.datagram.DatagramLink` in between (loss,
reordering), the service's store and index. The decoder is the test one (a real MRD parse that paints tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import REPO_ROOT, TESTS_DIR, ServiceProcess
from test_transport_mqtt import wait_until

from mridc.cloud.service.config import ServiceConfig
from mridc.cloud.service.ingest_coap import SliceAssembler, free_udp_port
from mridc.cloud.service.security import write_token_file
from mridc.cloud.service.server import Worker
from mridc.cloud.service.store import FrameStore
from mridc.edge.agent import EdgeAgent
from mridc.edge.queue import FrameQueue
from mridc.edge.transport.coap import CoapTransport, datagram_overhead
from mridc.lab.datagram import DatagramLink
from mridc.lab.synthetic import SYNTHETIC_MODEL_ID, SYNTHETIC_PRIOR, SyntheticEncoder, TokenPaintDecoder
from mridc.shared.protocol import (
    AckStatus,
    DatagramError,
    bitmap_indexes,
    device_key,
    parse_datagram,
    sign,
    slice_bitmap,
    verify,
)
from mridc.shared.slices import compress_sliced, pack_slices, unpack_slices
from mridc.v1 import mridc_pb2

pytestmark = [pytest.mark.net, pytest.mark.timeout(180)]

DEVICE, TOKEN = "cam-01", "cam-01-secret-token"


# -- pure parts -------------------------------------------------------------------------------------------
def _datagram(index: int, count: int, sequence: int = 1, deadline_ms: int = 1000, data: bytes | None = None):
    return mridc_pb2.SliceDatagram(device_id=DEVICE, sequence=sequence, capture_time_us=1_700_000_000_000_000,
                                   model_id=SYNTHETIC_MODEL_ID, slice_index=index, slice_count=count,
                                   slice=data if data is not None else bytes([index]) * 20, deadline_ms=deadline_ms)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_assembler_decodes_when_complete_or_at_the_deadline_and_again_for_late_slices():
    clock = FakeClock()
    gather = SliceAssembler(max_deadline_s=10, clock=clock)
    assert gather.add(_datagram(0, 3)) == "accepted"
    assert gather.add(_datagram(0, 3)) == "duplicate"
    assert gather.add(_datagram(0, 3, data=b"other")) == "conflict"  # same slot, other bytes
    assert gather.add(_datagram(1, 4)) == "conflict"  # disagrees on the slice count
    assert gather.take_due() == []  # incomplete, deadline not reached
    clock.now += 1.01
    (frame, _, held, update), = gather.take_due()
    assert held == [0] and not update and gather.take_due() == []  # in flight: not twice
    assert frame.report_status() == AckStatus.UNSPECIFIED
    gather.finished(frame, 1, mridc_pb2.FrameAck(status=AckStatus.STORED))
    assert frame.report_status() == AckStatus.STORED
    gather.add(_datagram(2, 3))  # late: the stored version no longer holds everything here
    assert frame.report_status() == AckStatus.UNSPECIFIED
    (_, _, held, update), = gather.take_due()
    assert held == [0, 2] and update
    gather.finished(frame, 2, mridc_pb2.FrameAck(status=AckStatus.RETRY_LATER))
    assert gather.take_due() == []  # held back a second
    clock.now += 1.5
    (_, _, held, _), = gather.take_due()
    gather.finished(frame, 2, mridc_pb2.FrameAck(status=AckStatus.STORED))
    gather.add(_datagram(1, 3))
    (_, _, held, update), = gather.take_due()  # complete: at once, no deadline wait
    assert held == [0, 1, 2] and update
    # A frame whose deadline is capped by the service.
    gather.add(_datagram(0, 2, sequence=2, deadline_ms=3_600_000))
    clock.now += 10.5
    assert [f.sequence for f, *_ in gather.take_due()] == [2]


def test_assembler_memory_is_bounded():
    clock = FakeClock()
    gather = SliceAssembler(max_frames=3, ttl_s=60, clock=clock)
    for seq in range(1, 6):
        clock.now += 1
        gather.add(_datagram(0, 2, sequence=seq))
    assert len(gather) == 3 and gather.evicted == 2 and gather.get(DEVICE, 1) is None
    clock.now += 61
    assert gather.expire() == 3 and len(gather) == 0


def test_datagram_signatures_and_bitmaps():
    key = device_key(TOKEN)
    message = sign(_datagram(0, 2), key)
    assert len(message.mac) == 8 and verify(message, key) and not verify(message, device_key("other"))
    tampered = mridc_pb2.SliceDatagram()
    tampered.CopyFrom(message)
    tampered.sequence += 1
    assert not verify(tampered, key)
    assert not verify(mridc_pb2.SliceDatagram(device_id=DEVICE), key)  # unsigned
    assert bitmap_indexes(slice_bitmap([0, 3, 9, 700], 10), 10) == {0, 3, 9}
    with pytest.raises(DatagramError) as info:
        parse_datagram(b"\x00" * 2000, mridc_pb2.SliceDatagram, max_bytes=1280)
    assert info.value.code == "too_large"
    for bad, code in ((_datagram(2, 2), "bad_slice_index"), (_datagram(0, 0), "bad_slice_count"),
                      (_datagram(0, 2, data=b""), "empty_slice")):
        with pytest.raises(DatagramError) as info:
            parse_datagram(bad.SerializeToString(), mridc_pb2.SliceDatagram, max_bytes=1280)
        assert info.value.code == code
    # The overhead a datagram adds to its slice, as the device budgets its slices.
    assert 40 <= datagram_overhead(DEVICE) <= 80


# -- an in-process service with its CoAP ingest ---------------------------------------------------------
@pytest.fixture
def coap_worker(tmp_path):
    tokens = write_token_file(tmp_path / "tokens.json", {DEVICE: TOKEN, "cam-02": "cam-02-token"})
    config = ServiceConfig(out_dir=tmp_path / "cloud", coap_addr="127.0.0.1:0", coap_tokens=tokens,
                           realism=0.0, refine_realism=0.0, decoder="test").validate()
    worker = Worker(config, TokenPaintDecoder())
    worker.start()
    yield worker
    worker.stop(drain_timeout=5)


def _counter(worker, name: str, **labels) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _sliced_stream(seed: int, max_bytes: int = 60) -> bytes:
    encoder = SyntheticEncoder()
    image = np.random.default_rng(seed).integers(0, 255, (192, 256, 3), dtype=np.uint8)
    result = encoder.encode(image, bpp=0.05)
    return pack_slices(compress_sliced(result.token_frame, SYNTHETIC_PRIOR, max_bytes))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=1400), mutate=st.integers(0, 10_000))
def test_ingest_never_crashes_on_random_or_mutated_datagrams(coap_worker, payload, mutate):
    """Random bytes, and valid signed datagrams with one byte changed, as both resources: each is counted
    under a result and nothing raises."""
    ingest = coap_worker.coap
    slices = unpack_slices(_sliced_stream(1))
    valid = sign(_datagram(mutate % len(slices), len(slices), data=slices[mutate % len(slices)]), device_key(TOKEN))
    raw = bytearray(valid.SerializeToString())
    if raw:
        raw[mutate % len(raw)] ^= 1 + mutate % 255
    for data in (payload, bytes(raw)):
        assert isinstance(ingest.handle_slice(data), str)
        report = ingest.handle_query(data)
        assert report is None or isinstance(mridc_pb2.SliceReport.FromString(report), mridc_pb2.SliceReport)


def _agent(tmp_path, port: int, *, retransmit: bool, token: str = TOKEN, device: str = DEVICE) -> EdgeAgent:
    transport = CoapTransport("127.0.0.1", port, device, token=token, retransmit=retransmit, deadline_s=1.0,
                              query_interval_s=0.2, query_timeout_s=0.5, give_up_s=4.0)
    return EdgeAgent(device_id=device, encoder=SyntheticEncoder(), transport=transport,
                     queue=FrameQueue(tmp_path / f"{device}-queue.db", device), slice_bytes=60, ack_timeout_s=30.0)


def _send_frames(agent: EdgeAgent, count: int, timeout: float = 60.0) -> None:
    rng = np.random.default_rng(7)
    agent.start()
    for i in range(count):
        agent.submit(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8), time.time_ns() // 1000 + i)
    deadline = time.monotonic() + timeout
    while len(agent.queue) and time.monotonic() < deadline:
        time.sleep(0.1)


def _sidecars(worker) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((worker.config.out_dir / "frames" / DEVICE).glob("*.json"))]


@pytest.mark.parametrize("retransmit", [True, False], ids=["retransmit", "no-retransmit"])
def test_twenty_percent_loss_through_the_link_emulator(tmp_path, coap_worker, retransmit):
    """20 % loss each way. With retransmission every frame arrives complete; without, every frame is still
    decoded (missing bands masked) and no slice is ever sent twice."""
    frames = 12
    with DatagramLink.symmetric(("127.0.0.1", coap_worker.coap.port), loss=0.2, reorder=0.1, seed=5) as link:
        agent = _agent(tmp_path, link.port, retransmit=retransmit)
        try:
            _send_frames(agent, frames)
            stats = agent.transport.stats
        finally:
            agent.stop()
    assert len(agent.queue) == 0, f"frames still queued: {agent.status()}"
    sidecars = _sidecars(coap_worker)
    assert len(sidecars) == frames - stats["frames_lost"]  # each frame stored once, or counted as lost
    assert all(s["slices"]["count"] > 1 for s in sidecars)
    complete = sum(len(s["slices"]["held"]) == s["slices"]["count"] for s in sidecars)
    if retransmit:
        assert stats["frames_lost"] == 0 and complete == frames and stats["slices_resent"] > 0
    else:
        assert stats["slices_resent"] == 0 and stats["slices_sent"] == agent.stats["slices"]
        assert len(sidecars) >= frames - 1 and complete < frames  # at 20 % loss some frame lost a slice
        assert _counter(coap_worker, "mridc_frames_partial_total") >= 1
    # The picture on disk is the token painting of what the store says it decoded.
    record = sidecars[0]
    image = cv2.imread(str(coap_worker.config.out_dir / record["png_path"]))
    assert image.shape[:2] == (192, 256)


def test_late_slices_make_a_new_version_of_a_stored_frame(tmp_path, coap_worker):
    ingest, key = coap_worker.coap, device_key(TOKEN)
    slices = unpack_slices(_sliced_stream(3))
    count = len(slices)
    assert count >= 3

    def datagram(i):
        return sign(_datagram(i, count, sequence=9, deadline_ms=300, data=slices[i]), key).SerializeToString()

    for i in range(count - 1):
        assert ingest.handle_slice(datagram(i)) == "accepted"
    store = FrameStore(coap_worker.config.out_dir)
    deadline = time.monotonic() + 10
    while store.stored_slices(DEVICE, 9) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stored_slices(DEVICE, 9) == (count - 1, count)
    assert ingest.handle_slice(datagram(count - 1)) == "accepted"
    while store.stored_slices(DEVICE, 9) != (count, count) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stored_slices(DEVICE, 9) == (count, count)
    record = store.load_record(DEVICE, 9)
    store.close()
    assert record.versions["updates"][0]["slices_held"] == count - 1
    assert _counter(coap_worker, "mridc_frames_updated_total") == 1
    # A query reports every slice held and the frame stored.
    query = sign(mridc_pb2.SliceQuery(device_id=DEVICE, sequence=9, nonce=b"abcd"), key).SerializeToString()
    report = mridc_pb2.SliceReport.FromString(ingest.handle_query(query))
    assert verify(report, key) and report.nonce == b"abcd" and report.status == AckStatus.STORED
    assert bitmap_indexes(report.received, report.slice_count) == set(range(count))


def test_forged_oversized_and_unknown_datagrams_are_counted_and_serving_goes_on(tmp_path, coap_worker):
    ingest = coap_worker.coap
    good = _sliced_stream(4, max_bytes=1000)
    slices = unpack_slices(good)
    forged = sign(_datagram(0, len(slices), sequence=5, data=slices[0]), device_key("not-the-token"))
    assert ingest.handle_slice(forged.SerializeToString()) == "refused"
    unsigned = _datagram(0, len(slices), sequence=5, data=slices[0])
    assert ingest.handle_slice(unsigned.SerializeToString()) == "refused"
    stranger = sign(mridc_pb2.SliceDatagram(device_id="cam-99", sequence=1, capture_time_us=1, model_id=1,
                                            slice_index=0, slice_count=1, slice=b"x"), device_key("x"))
    assert ingest.handle_slice(stranger.SerializeToString()) == "refused"
    assert ingest.handle_slice(b"\xff" * 5000) == "too_large"
    assert ingest.handle_slice(b"\x0a\x05") == "malformed"
    corrupt = bytearray(slices[0])
    corrupt[-1] ^= 0xFF  # the slice's own CRC
    bad_slice = sign(_datagram(0, len(slices), sequence=5, data=bytes(corrupt)), device_key(TOKEN))
    assert ingest.handle_slice(bad_slice.SerializeToString()) == "bad_slice"
    wrong_model = _datagram(0, len(slices), sequence=5, data=slices[0])
    wrong_model.model_id = 1234
    assert ingest.handle_slice(sign(wrong_model, device_key(TOKEN)).SerializeToString()) == "unknown_model"
    forged_query = sign(mridc_pb2.SliceQuery(device_id=DEVICE, sequence=5), device_key("nope"))
    assert ingest.handle_query(forged_query.SerializeToString()) is None
    assert _counter(coap_worker, "mridc_datagrams_total", kind="slice", result="bad_mac") == 2
    assert _counter(coap_worker, "mridc_datagrams_total", kind="slice", result="unknown_device") == 1
    assert _counter(coap_worker, "mridc_datagrams_total", kind="slice", result="too_large") == 1
    assert _counter(coap_worker, "mridc_datagrams_total", kind="slice", result="bad_slice") == 1
    assert _counter(coap_worker, "mridc_datagrams_total", kind="query", result="bad_mac") == 1
    assert len(ingest.assembler) == 0  # none of them is held
    # A device whose token is wrong gets nothing stored and no ack (its reports are dropped too) ...
    with DatagramLink.symmetric(("127.0.0.1", ingest.port), seed=1) as link:
        impostor = _agent(tmp_path, link.port, retransmit=True, token="wrong", device="cam-02")
        try:
            _send_frames(impostor, 1, timeout=2.0)
            assert len(impostor.queue) == 1
        finally:
            impostor.stop()
        # ... and the real device is served as before.
        agent = _agent(tmp_path, link.port, retransmit=True)
        try:
            _send_frames(agent, 2)
        finally:
            agent.stop()
    assert len(agent.queue) == 0 and len(_sidecars(coap_worker)) == 2


# -- real processes: kill -9 of the agent, a service restart ------------------------------------------------
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


def test_agent_kill9_and_service_restart_over_a_lossy_link_lose_nothing(tmp_path):
    """`mridc-edge run --transport coap://` (real CLI) through the emulator at 15 % loss into `mridc-cloud serve
    --coap` (real process). The service is killed with SIGKILL and restarted on the same port mid-stream; then
    the agent is killed with SIGKILL and restarted. Every accepted frame ends up stored once, with all slices."""
    images = tmp_path / "frames"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        cv2.imwrite(str(images / f"f{i}.png"), rng.integers(0, 255, (160, 224, 3), dtype=np.uint8))
    write_token_file(tmp_path / "tokens.json", {DEVICE: TOKEN})
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_udp_port("127.0.0.1")
    serve = ["--coap", f"127.0.0.1:{port}", "--coap-tokens", str(tmp_path / "tokens.json"), "--out",
             str(tmp_path / "cloud"), "--decoder", "service_helpers:make_test_decoder", "--refine-realism", "0",
             "--log-format", "json"]
    log_path = tmp_path / "service.log"
    queue_path = tmp_path / "queue.db"
    link = DatagramLink.symmetric(("127.0.0.1", port), loss=0.15, seed=11).start()
    edge = [sys.executable, "-c", _EDGE_PROCESS, "--device-id", DEVICE, "--source", str(images), "--loop",
            "--fps", "4", "--bpp", "0.05", "--transport", f"coap://127.0.0.1:{link.port}", "--token-file",
            str(tmp_path / "token"), "--queue", str(queue_path), "--slice-bytes", "60", "--deadline", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p))

    def stored() -> int:
        store = FrameStore(tmp_path / "cloud")
        try:
            return store.count()
        finally:
            store.close()

    service = ServiceProcess(serve, log_path=log_path, timeout=60)
    first = subprocess.Popen(edge, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    try:
        assert wait_until(lambda: stored() >= 3, 60), service.log_tail()
        service.kill()  # SIGKILL: the slices it was gathering are gone
        time.sleep(1.5)  # the agent keeps capturing and sending into nothing
        service = ServiceProcess(serve, log_path=log_path, timeout=60)
        before = stored()
        assert wait_until(lambda: stored() >= before + 3, 60), service.log_tail()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    try:
        with FrameQueue(queue_path, DEVICE) as queue:
            accepted_before = queue.next_sequence - 1
        second = subprocess.run(edge + ["--max-frames", "4", "--drain-timeout", "90"], check=False,
                                capture_output=True, text=True, env=env, timeout=150, cwd=REPO_ROOT)
        assert second.returncode == 0, second.stderr[-3000:]
        with FrameQueue(queue_path, DEVICE) as queue:
            assert len(queue) == 0
            accepted = queue.next_sequence - 1
        assert accepted == accepted_before + 4
        store = FrameStore(tmp_path / "cloud")
        rows = store.query(device_id=DEVICE)
        records = [store.load_record(DEVICE, r["sequence"]) for r in rows]
        store.close()
        assert [r["sequence"] for r in rows] == list(range(1, accepted + 1))
        incomplete = [r.sequence for r in records if len(r.slices["held"]) != r.slices["count"]]
        assert not incomplete, f"stored without every slice: {incomplete}"
        assert service.terminate() == 0
    finally:
        service.close()
        link.stop()


def test_serve_refuses_coap_without_keys(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mridc.cloud.service.cli", "serve", "--coap", "127.0.0.1:5999",
                             "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT)
    assert result.returncode == 2 and "coap_tokens" in result.stderr


def test_the_default_slice_budget_fits_a_lorawan_payload():
    """At a 222-byte LoRaWAN payload the agent's default slice size leaves room for the datagram fields, and a
    datagram of a slice that size is within the MTU."""
    transport = CoapTransport("127.0.0.1", 5683, DEVICE, mtu=222, token=TOKEN)
    assert 140 <= transport.max_slice_bytes <= 222 - 40
    envelope = mridc_pb2.FrameEnvelope(device_id=DEVICE, sequence=123456, capture_time_us=time.time_ns() // 1000,
                                       model_id=2**32 - 1, bitstream=pack_slices([b"MR" + b"\0" * (
                                           transport.max_slice_bytes - 2)] * 3))
    sizes = [len(d) for d in transport._datagrams(envelope)]
    assert max(sizes) + 16 <= 222 and transport.stats["oversized"] == 0
    # CoAP's bytes around a slice datagram, as aiocoap writes them (2-byte token), fit the budgeted 16.
    import aiocoap

    from mridc.edge.transport.coap import COAP_HEADER_BYTES

    message = aiocoap.Message(code=aiocoap.POST, uri="coap://127.0.0.1/s", payload=b"x" * 100,
                              transport_tuning=aiocoap.Unreliable)
    message.opt.no_response = 26
    message.mid, message.token, message.mtype = 1, b"\x12\x34", aiocoap.NON
    assert len(message.encode()) - 100 <= COAP_HEADER_BYTES
