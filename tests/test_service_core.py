"""Cloud service core, in process: validation, the durable index, the decode loop, rate limit, CLI, config."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from service_helpers import TEST_MODEL_ID, TokenPaintDecoder, expected_image, make_envelope, make_stream

from mridc.cloud.service.cli import add_frames_arguments, parse_time_us, run_frames
from mridc.cloud.service.config import ConfigError, ServiceConfig, load_config
from mridc.cloud.service.ratelimit import DeviceRateLimiter
from mridc.cloud.service.store import BUSY, CLAIMED, DUPLICATE, ClaimLost, FrameStore, StoredFrame, WorkerIdInUse
from mridc.cloud.service.validation import (
    FrameRejected,
    Limits,
    check_envelope,
    parse_envelope,
    validate_envelope,
)
from mridc.cloud.service.worker import DecodeJob, DecodeQueue, DecodeService
from mridc.shared.protocol import device_from_topic
from mridc.v1 import mridc_pb2

Ack = mridc_pb2.FrameAck


def reject_code(envelope, limits=None, **kwargs):
    with pytest.raises(FrameRejected) as info:
        validate_envelope(envelope, limits or Limits(), TokenPaintDecoder().validate,
                          known_model_ids=TokenPaintDecoder.model_ids, **kwargs)
    return info.value.code


def test_validation_accepts_a_good_frame_and_names_each_failure():
    good = make_envelope("cam-a", 7)
    frame = validate_envelope(good, Limits(), TokenPaintDecoder().validate, topic_device="cam-a")
    assert frame.token_frame.model_id == TEST_MODEL_ID and frame.token_frame.grid_w == 8

    stream = make_stream("cam-a", 7)
    corrupt = stream[:10] + bytes([stream[10] ^ 0x40]) + stream[11:]
    assert reject_code(make_envelope("bad/id", 1)) == "bad_device_id"
    assert reject_code(make_envelope("cam-a", 1), topic_device="cam-b") == "topic_mismatch"
    assert reject_code(make_envelope("cam-a", 1), authenticated_device="cam-b") == "unauthorized_device"
    assert reject_code(make_envelope("cam-a", 1, capture_time_us=0)) == "bad_capture_time"
    assert reject_code(make_envelope("cam-a", 1, bitstream=b"")) == "empty_bitstream"
    assert reject_code(make_envelope("cam-a", 1), Limits(max_bitstream_bytes=16)) == "bitstream_too_large"
    assert reject_code(make_envelope("cam-a", 1, content_hash=b"\0" * 32)) == "hash_mismatch"
    assert reject_code(make_envelope("cam-a", 1, bitstream=corrupt)) == "bad_bitstream"
    assert reject_code(make_envelope("cam-a", 1, bitstream=b"JPEG" * 10)) == "bad_bitstream"
    assert reject_code(make_envelope("cam-a", 1, model_id=1234)) == "unknown_model"
    assert reject_code(make_envelope("cam-a", 1, meta={"k": "v" * 5000})) == "meta_too_large"
    assert reject_code(make_envelope("cam-a", 2**63)) == "bad_sequence"
    # A stream whose header names another model than the envelope claims.
    with pytest.raises(FrameRejected, match="model_id_mismatch"):
        validate_envelope(make_envelope("cam-a", 1, model_id=99), Limits(), TokenPaintDecoder().validate)


def test_payload_limits_come_before_parsing():
    with pytest.raises(FrameRejected, match="payload_too_large"):
        parse_envelope(b"\0" * 70_000, Limits())
    with pytest.raises(FrameRejected, match="malformed_envelope"):
        parse_envelope(b"\xff\xff\xff\xff garbage", Limits())
    envelope = parse_envelope(make_envelope("cam-a", 3).SerializeToString(), Limits())
    check_envelope(envelope, Limits())
    assert device_from_topic("mridc/v1/cam-a/frames") == "cam-a" and device_from_topic("x/cam-a") is None


def test_store_claims_dedupe_and_takeover(tmp_path):
    store = FrameStore(tmp_path, dead_after_s=0.5)
    store.register_instance("w0:1", "w0")
    store.register_instance("w1:1", "w1")
    assert store.claim("cam-a", 1, "w0:1") == CLAIMED
    assert store.claim("cam-a", 1, "w1:1") == BUSY  # w0 is alive and decoding it
    time.sleep(0.7)  # neither heart-beats: both dead
    store.register_instance("w0:2", "w0")  # w0's slot restarts under a new instance
    assert store.claim("cam-a", 1, "w1:1") == CLAIMED
    assert store.claim("cam-a", 2, "w1:1") == CLAIMED
    time.sleep(0.7)  # w1 stops heart-beating: dead
    assert store.claim("cam-a", 2, "w0:2") == CLAIMED
    store.release("cam-a", 2, "w0:2")
    assert store.claim("cam-a", 2, "w0:2") == CLAIMED
    record = StoredFrame("cam-a", 2, 1_700_000_000_000_000, 64, 48, 72, 0.19, TEST_MODEL_ID, "test", "w0")
    store.put(record, image=expected_image("cam-a", 2), instance="w0:2")
    assert store.claim("cam-a", 2, "w1:1") == DUPLICATE and store.is_stored("cam-a", 2)
    assert [r["sequence"] for r in store.query("cam-a")] == [2]
    store.close()


def _spawn_sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_worker_id_is_refused_and_a_killed_owner_is_dead_at_once(tmp_path):
    store = FrameStore(tmp_path, dead_after_s=60)
    other = _spawn_sleeper()  # another live process on this machine, holding worker id "w0"
    try:
        store.register_instance("w0:other", "w0", pid=other.pid)
        with pytest.raises(WorkerIdInUse, match=f"pid {other.pid} on this machine"):
            store.register_instance("w0:me", "w0")
        assert store.claim("cam-a", 1, "w0:other") == CLAIMED
        store.register_instance("w1:me", "w1")
        assert store.claim("cam-a", 1, "w1:me") == BUSY
        other.kill()  # kill -9, and not reaped yet: a zombie is dead too
        time.sleep(0.2)
        assert store.claim("cam-a", 1, "w1:me") == CLAIMED  # no heartbeat timeout to wait for
        store.register_instance("w0:me", "w0")  # the id is free again
    finally:
        other.kill()
        other.wait()
    store.close()


def test_a_decode_whose_claim_was_taken_over_is_not_stored(tmp_path):
    store = FrameStore(tmp_path, dead_after_s=0.3)
    store.register_instance("a:1", "a")
    store.register_instance("b:1", "b")
    assert store.claim("cam-a", 5, "a:1") == CLAIMED
    time.sleep(0.5)  # a is frozen: b takes the claim over, decodes and stores
    store.heartbeat("b:1")
    assert store.claim("cam-a", 5, "b:1") == CLAIMED
    record = StoredFrame("cam-a", 5, 1_700_000_000_000_000, 64, 48, 72, 0.19, TEST_MODEL_ID, "test", "b")
    store.put(record, image=expected_image("cam-a", 5), instance="b:1")
    late = StoredFrame("cam-a", 5, 1_700_000_000_000_000, 64, 48, 72, 0.19, TEST_MODEL_ID, "test", "a")
    with pytest.raises(ClaimLost):  # a wakes up with its decode: refused, the stored row is b's
        store.put(late, image=expected_image("cam-a", 5), instance="a:1")
    assert [r["worker_id"] for r in store.query("cam-a")] == ["b"]
    store.close()


def test_an_index_from_before_machine_keys_is_upgraded(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("CREATE TABLE instances (instance TEXT PRIMARY KEY, worker_id TEXT NOT NULL, pid INTEGER, "
               "started_at REAL NOT NULL, last_seen REAL NOT NULL)")
    db.execute("INSERT INTO instances VALUES ('old:1', 'old', 1, 0, 0)")
    db.commit()
    db.close()
    store = FrameStore(tmp_path)
    store.register_instance("new:1", "old")  # the old row is long dead
    assert store.claim("cam-a", 1, "new:1") == CLAIMED
    store.close()


def make_service(tmp_path, decoder=None, **overrides):
    config = ServiceConfig(out_dir=tmp_path, grpc_addr="127.0.0.1:0", allow_insecure=True, worker_id="t0",
                           **overrides).validate()
    service = DecodeService(config, decoder or TokenPaintDecoder(), FrameStore(tmp_path), instance="t0:1")
    service.start()
    return service


def submit_and_wait(service, envelope, timeout=10.0, **kwargs):
    acks = []
    service.submit(envelope, "test", acks.append, **kwargs)
    deadline = time.monotonic() + timeout
    while not acks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acks, "no ack"
    return acks[0]


def test_decode_service_stores_png_and_sidecar_once(tmp_path):
    service = make_service(tmp_path)
    try:
        ack = submit_and_wait(service, make_envelope("cam-a", 5))
        assert (ack.status, ack.device_id, ack.sequence) == (Ack.STORED, "cam-a", 5)
        again = submit_and_wait(service, make_envelope("cam-a", 5))
        assert again.status == Ack.DUPLICATE
        bad = submit_and_wait(service, make_envelope("cam-a", 6, content_hash=b"x" * 32))
        assert bad.status == Ack.REJECTED and bad.reason.startswith("hash_mismatch")
        png = tmp_path / "frames" / "cam-a" / "cam-a_000000000005.png"
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert np.array_equal(np.asarray(Image.open(png)), expected_image("cam-a", 5))
        assert sidecar["device_id"] == "cam-a" and sidecar["sequence"] == 5
        assert sidecar["bits"] == 8 * len(make_stream("cam-a", 5))
        assert sidecar["bpp"] == pytest.approx(sidecar["bits"] / (64 * 48))
        assert sidecar["decode"]["realism"] == 0.0 and "decode_batch_s" in sidecar["timings"]
        assert service.decoded_count == 1
        assert service.metrics.frames_duplicate._value.get() == 1
        assert service.metrics.frames_rejected.labels("hash_mismatch")._value.get() == 1
    finally:
        service.stop()


def test_decode_service_batches_and_survives_a_poisoned_batch(tmp_path):
    class Flaky(TokenPaintDecoder):
        def decode_frames(self, frames, settings=None):
            if any(f == poison for f in frames):
                raise RuntimeError("decoder bug")
            return super().decode_frames(frames, settings)

    poison = TokenPaintDecoder().validate(make_stream("cam-p", 3))
    service = make_service(tmp_path, Flaky(delay_s=0.01), batch_size=4, batch_wait_ms=50)
    try:
        acks = []
        for seq in range(1, 7):
            service.submit(make_envelope("cam-p", seq), "test", acks.append)
        deadline = time.monotonic() + 10
        while len(acks) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        by_seq = {a.sequence: a for a in acks}
        assert by_seq[3].status == Ack.REJECTED and "decode_failed" in by_seq[3].reason
        assert all(by_seq[s].status == Ack.STORED for s in (1, 2, 4, 5, 6))
        assert service.metrics.batch_size._sum.get() == 6  # every frame went through a batch
        assert service.store.count() == 5
    finally:
        service.stop()


def test_rate_limit_answers_retry_later(tmp_path):
    now = [0.0]
    limiter = DeviceRateLimiter(rate=2, burst=2, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")
    now[0] += 0.5
    assert limiter.allow("a") and not limiter.allow("a")

    service = make_service(tmp_path, rate_limit_fps=0.01, rate_limit_burst=1)
    try:
        assert submit_and_wait(service, make_envelope("cam-r", 1)).status == Ack.STORED
        limited = submit_and_wait(service, make_envelope("cam-r", 2))
        assert limited.status == Ack.RETRY_LATER and limited.reason == "rate limited"
        assert submit_and_wait(service, make_envelope("cam-r", 1)).status == Ack.DUPLICATE  # dups are free
        assert not service.store.is_stored("cam-r", 2)
    finally:
        service.stop()


def test_decode_queue_is_bounded_for_waiting_producers():
    queue = DecodeQueue(capacity=2)
    job = DecodeJob(frame=None, transport="grpc", received_mono=0.0)
    assert queue.put(job, wait=0.01) and queue.put(job, wait=0.01)
    start = time.monotonic()
    assert not queue.put(job, wait=0.1)  # full: the gRPC lane waits, then gives up
    assert time.monotonic() - start >= 0.09
    assert queue.put(job)  # the MQTT lane always admits (the broker's Receive Maximum bounds it)
    assert len(queue.get_batch(8, 0.0)) == 3


def test_frames_cli_lists_by_device_and_time(tmp_path, capsys):
    service = make_service(tmp_path)
    try:
        base = time.time_ns() // 1000
        for device, seq, age_s in (("cam-a", 1, 7200), ("cam-a", 2, 60), ("cam-b", 1, 30)):
            ack = submit_and_wait(service, make_envelope(device, seq, capture_time_us=base - age_s * 1_000_000))
            assert ack.status == Ack.STORED
    finally:
        service.stop()
    parser = add_frames_arguments(argparse.ArgumentParser())
    assert run_frames(parser.parse_args(["--out", str(tmp_path), "--device", "cam-a", "--json"])) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["device_id"], r["sequence"]) for r in rows] == [("cam-a", 1), ("cam-a", 2)]
    assert rows[0]["png_path"] == "frames/cam-a/cam-a_000000000001.png"
    assert run_frames(parser.parse_args(["--out", str(tmp_path), "--since", "10m"])) == 0
    out = capsys.readouterr().out
    assert "cam-a" in out and "cam-b" in out and "2 frame(s)" in out
    assert run_frames(parser.parse_args(["--out", str(tmp_path / "nowhere")])) == 2


def test_time_parsing():
    assert parse_time_us("1700000000") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20Z") == 1_700_000_000_000_000
    assert parse_time_us("10m", now=1000.0) == 400_000_000
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time_us("yesterday-ish")


def test_config_file_flags_and_clear_errors(tmp_path):
    path = tmp_path / "service.toml"
    path.write_text('[service]\nmqtt_url = "mqtt://127.0.0.1:1883"\nqueue_size = 8\nworker_id = "w-1"\n')
    config = load_config(path, batch_size=2)
    assert (config.queue_size, config.batch_size, config.worker_id) == (8, 2, "w-1")
    with pytest.raises(ConfigError, match="unknown config keys: queue_sise"):
        load_config(None, mqtt_url="mqtt://h:1", queue_sise=3)
    with pytest.raises(ConfigError, match="mqtts:// needs mqtt_ca"):
        load_config(None, mqtt_url="mqtts://h:1")
    with pytest.raises(ConfigError, match="gRPC needs grpc_cert"):
        load_config(None, grpc_addr="127.0.0.1:0")
    with pytest.raises(ConfigError, match="nothing to ingest"):
        load_config(None)


def test_png_helper_roundtrip():
    from mridc.cloud.service.worker import encode_png

    image = expected_image("cam-z", 1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)


def test_service_with_the_real_decoder_at_realism_0(tmp_path):
    """The shipped MRIDCDecoder behind the service (the models are in the tree: a load failure fails)."""
    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.edge.encoder import EdgeEncoder

    decoder = MRIDCDecoder.from_models()
    encoder = EdgeEncoder.from_bundle()
    yy, xx = np.mgrid[0:128, 0:192]
    image = np.stack([xx * 255 // 191, yy * 255 // 127, (xx + yy) % 256], axis=-1).astype(np.uint8)
    stream = encoder.encode(image, bpp=0.05).bitstream
    model_id = decoder.validate(stream).model_id
    service = make_service(tmp_path, decoder, realism=0.0)
    try:
        envelope = make_envelope("cam-real", 1, bitstream=stream, model_id=model_id)
        assert submit_and_wait(service, envelope, timeout=120).status == Ack.STORED
        assert submit_and_wait(service, envelope).status == Ack.DUPLICATE
        corrupt = stream[:-1] + bytes([stream[-1] ^ 1])
        bad = submit_and_wait(service, make_envelope("cam-real", 2, bitstream=corrupt, model_id=model_id))
        assert bad.status == Ack.REJECTED and bad.reason.startswith("bad_bitstream")
        stored = np.asarray(Image.open(tmp_path / "frames" / "cam-real" / "cam-real_000000000001.png"))
        assert stored.shape == image.shape
    finally:
        service.stop()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_progressive_delivery_acks_the_preview_then_refines_it(tmp_path):
    from mridc.cloud.service.store import PREVIEW, REFINED

    announced = []
    service = make_service(tmp_path, TokenPaintDecoder(delay_s=0.2), refine_realism=0.5)
    service.picture_listeners.append(lambda record: announced.append((record.sequence, record.stage)))
    try:
        acked = []
        service.submit(make_envelope("cam-a", 1), "test",
                       lambda ack: acked.append((ack.status, service.refined_count, list(announced))))
        assert wait_for(lambda: acked)
        # Acked once the preview is stored: before any refinement, and before the announcement.
        assert acked == [(mridc_pb2.FrameAck.STORED, 0, [])]
        first = json.loads((tmp_path / "frames/cam-a/cam-a_000000000001.json").read_text())
        assert first["stage"] in (PREVIEW, REFINED) and first["versions"][PREVIEW]["decode"]["realism"] == 0.0
        assert wait_for(lambda: service.refined_count == 1)
        sidecar = json.loads((tmp_path / "frames/cam-a/cam-a_000000000001.json").read_text())
        assert sidecar["stage"] == REFINED and sidecar["versions"][REFINED]["decode"]["realism"] == 0.5
        assert sidecar["versions"][REFINED]["stored_at"] >= sidecar["versions"][PREVIEW]["stored_at"]
        preview_png = tmp_path / sidecar["versions"][PREVIEW]["png_path"]
        assert preview_png.name.endswith(".preview.png") and preview_png.exists()
        assert (tmp_path / sidecar["bitstream_path"]).read_bytes() == make_envelope("cam-a", 1).bitstream
        assert announced == [(1, PREVIEW), (1, REFINED)]
        assert [r["stage"] for r in service.store.query("cam-a")] == [REFINED]
        # A redelivery after the refinement is a duplicate: not decoded, not refined again.
        assert submit_and_wait(service, make_envelope("cam-a", 1)).status == mridc_pb2.FrameAck.DUPLICATE
        time.sleep(0.5)
        assert service.decoded_count == 1 and service.refined_count == 1
    finally:
        service.stop()


def test_live_frames_go_before_refinements(tmp_path):
    service = make_service(tmp_path, TokenPaintDecoder(delay_s=0.1), refine_realism=0.5, queue_size=16)
    try:
        acks = []
        for seq in range(1, 7):
            service.submit(make_envelope("cam-a", seq), "test", acks.append)
        assert wait_for(lambda: len(acks) == 6)
        # While the six live frames waited, no refinement ran in between.
        assert service.refined_count <= 1
        assert wait_for(lambda: service.refined_count == 6)
    finally:
        service.stop()


def test_a_dead_workers_refinements_are_taken_over(tmp_path):
    from mridc.cloud.service.store import PREVIEW, REFINED

    dead = make_service(tmp_path, TokenPaintDecoder(), refine_realism=0.5)
    dead.refining = False  # it stores previews but never gets to refine them (as if killed after the ack)
    record_stage = []
    dead.picture_listeners.append(lambda r: record_stage.append(r.stage))
    try:
        for seq in (1, 2):
            assert submit_and_wait(dead, make_envelope("cam-a", seq)).status == mridc_pb2.FrameAck.STORED
    finally:
        dead.stop()
    assert record_stage == [PREVIEW, PREVIEW]
    config = ServiceConfig(out_dir=tmp_path, grpc_addr="127.0.0.1:0", allow_insecure=True, worker_id="t1",
                           refine_realism=0.5).validate()
    heir = DecodeService(config, TokenPaintDecoder(), FrameStore(tmp_path, dead_after_s=0.2), instance="t1:1")
    heir.store._db.execute("UPDATE instances SET last_seen = 0")  # t0's heartbeat is long gone
    heir.start()
    try:
        assert wait_for(lambda: heir.refined_count == 2)
        assert [r["stage"] for r in heir.store.query("cam-a")] == [REFINED, REFINED]
        assert heir.decoded_count == 0
    finally:
        heir.stop()


def test_a_preview_whose_stream_is_gone_stays_final(tmp_path):
    from mridc.cloud.service.store import FINAL

    service = make_service(tmp_path, TokenPaintDecoder(delay_s=0.3), refine_realism=0.5)
    try:
        service.refining = False
        assert submit_and_wait(service, make_envelope("cam-a", 1)).status == mridc_pb2.FrameAck.STORED
        (tmp_path / "frames/cam-a/cam-a_000000000001.mrd").write_bytes(b"MRD\x00 truncated")
        service.refining = True
        service._refine_hint.set()
        assert wait_for(lambda: service.store.query("cam-a")[0]["stage"] == FINAL)
        assert service.refined_count == 0
        sidecar = json.loads((tmp_path / "frames/cam-a/cam-a_000000000001.json").read_text())
        assert "refinement_abandoned" in sidecar["versions"]["preview"]
    finally:
        service.stop()
