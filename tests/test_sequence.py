"""Inter frames end to end: the edge's SequenceEncoder (shipped ONNX encoder), the cloud's reference store and
NEED_INTRA, the queue's intra fallback, and scenarios with the real broker, service and link emulator."""

from __future__ import annotations

import json
import os
import re
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

from mridc.cloud.sequence import NeedIntra, SequenceFrames
from mridc.cloud.service.config import ServiceConfig
from mridc.cloud.service.store import FrameStore, decode_grid, encode_grid
from mridc.cloud.service.worker import DecodeService
from mridc.edge.encoder import EdgeEncoder
from mridc.edge.queue import FrameQueue
from mridc.edge.sequence import SequenceConfig, SequenceEncoder
from mridc.lab.synthetic import make_bundle_paint_decoder
from mridc.shared.bitstream import compress
from mridc.shared.inter import ReferenceGrid, is_inter
from mridc.shared.protocol import AckStatus, build_envelope

DEMO_CLIP = Path(__file__).resolve().parents[1] / "src/mridc/firmware_sim/demo_assets/vtest_500-539.avi"
DEVICE = "cam-01"


@pytest.fixture(scope="module")
def encoder() -> EdgeEncoder:
    return EdgeEncoder.from_bundle()


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    """Frames of a fixed camera (the demo's held-out vtest clip), shrunk so each test stays fast."""
    capture = cv2.VideoCapture(str(DEMO_CLIP))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (256, 192), interpolation=cv2.INTER_AREA))
    assert len(frames) >= 30
    return frames[::4]


def test_the_cloud_rebuilds_exactly_the_grid_the_edge_coded_against(encoder, clip):
    coder = SequenceEncoder(encoder, SequenceConfig(refresh_period=0))
    cloud = SequenceFrames(encoder.prior, model_id=encoder.model_id)
    kinds, sizes = [], []
    for number, image in enumerate(clip[:6], 1):
        coded = coder.encode(image, number, bpp=0.05)
        frame = cloud.token_frame(coded.bitstream, DEVICE, number)
        coder.acknowledge(number)
        assert cloud.references[(DEVICE, number)] == coded.grid
        assert np.array_equal(frame.keep_mask, coded.grid.known)
        kinds.append(coded.kind)
        sizes.append(len(coded.bitstream))
    assert kinds == ["intra"] + ["inter"] * 5
    assert all(is_inter(b) for b in [coder.encode(clip[5], 7, bpp=0.05).bitstream])
    # The same picture again: nothing changed, the inter frame is a few dozen bytes.
    coder.acknowledge(7)
    again = coder.encode(clip[5], 8, bpp=0.05)
    assert again.kind == "inter" and again.changed == again.refreshed == 0 and len(again.bitstream) <= 32


def test_only_stored_frames_become_references(encoder, clip):
    coder = SequenceEncoder(encoder, SequenceConfig(refresh_period=3))
    assert coder.encode(clip[0], 1, 0.05).kind == "intra"
    second = coder.encode(clip[1], 2, 0.05)
    assert second.kind == "intra" and second.reason == "no acknowledged reference"  # 1 has no ack yet
    coder.acknowledge(1)
    coder.acknowledge(2, stored=False)  # rejected: never a reference
    third = coder.encode(clip[2], 3, 0.05)
    assert (third.kind, third.ref_sequence) == ("inter", 1)
    coder.acknowledge(3)
    assert coder.encode(clip[3], 4, 0.05).ref_sequence == 3
    coder.acknowledge(4)
    assert coder.encode(clip[4], 5, 0.05).ref_sequence == 4
    coder.acknowledge(5)
    assert coder.encode(clip[5], 6, 0.05).reason == "refresh period"  # 3 inter frames since the last intra
    coder.acknowledge(6)
    coder.force_intra("reconnect")
    assert coder.encode(clip[6], 7, 0.05).reason == "reconnect"


def test_reference_grids_survive_the_store(tmp_path):
    rng = np.random.default_rng(0)
    grid = ReferenceGrid(rng.integers(0, 1024, (9, 13)), rng.random((9, 13)) < 0.6)
    assert decode_grid(encode_grid(grid)) == grid
    store = FrameStore(tmp_path)
    for seq in range(1, 80):
        store.put_reference(DEVICE, seq, grid)
    assert store.get_reference(DEVICE, 79) == grid and store.get_reference(DEVICE, 10) is None  # newest 64 kept
    store.close()
    assert FrameStore(tmp_path).references.get((DEVICE, 79)) == grid  # durable


def test_need_intra_then_the_fallback_is_stored(tmp_path, encoder, clip):
    """A cloud without the reference answers NEED_INTRA; the queue swaps in the intra fallback, which stores;
    the next inter frame then finds its reference."""
    config = ServiceConfig(out_dir=tmp_path / "cloud", grpc_addr="127.0.0.1:0", allow_insecure=True,
                           realism=0.0, refine_realism=0.0, decoder="test").validate()
    store = FrameStore(config.out_dir)
    service = DecodeService(config, make_bundle_paint_decoder(), store)
    service.start()
    acks: list = []
    try:
        coder = SequenceEncoder(encoder)
        queue = FrameQueue(tmp_path / "queue.db", DEVICE)
        first = coder.encode(clip[0], 1, 0.05)
        coder.acknowledge(1)  # the device believes 1 is stored, but this cloud never saw it
        second = coder.encode(clip[1], 2, 0.05)
        assert second.kind == "inter"
        queue.put(first.bitstream, model_id=encoder.model_id)
        queue.put(second.bitstream, model_id=encoder.model_id,
                  fallback=compress(coder.intra_frame(second), encoder.prior))
        frame2 = queue.pending(limit=2)[1]

        def submit(frame):
            done = threading.Event()
            service.submit(frame.to_envelope(), "test", lambda ack: (acks.append(ack), done.set()))
            assert done.wait(20)
            return acks[-1]

        assert submit(frame2).status == AckStatus.NEED_INTRA
        assert service.metrics.frames_need_intra._value.get() == 1
        assert queue.use_fallback(2) and not queue.use_fallback(2)
        retry = queue.pending(limit=2)[1]
        assert not is_inter(retry.bitstream) and retry.meta["kind"] == "intra"
        assert submit(retry).status == AckStatus.STORED
        coder.acknowledge(2)
        third = coder.encode(clip[2], 3, 0.05)
        assert third.ref_sequence == 2
        envelope = build_envelope(DEVICE, 3, third.bitstream, encoder.model_id)
        done = threading.Event()
        service.submit(envelope, "test", lambda ack: (acks.append(ack), done.set()))
        assert done.wait(20) and acks[-1].status == AckStatus.STORED
        assert store.get_reference(DEVICE, 3) == third.grid
    finally:
        service.stop(drain_timeout=5)
        store.close()


def test_sequence_cli_round_trip(tmp_path):
    mrd, png = tmp_path / "mrd", tmp_path / "png"
    run = [sys.executable, "-m", "mridc.edge.cli", "encode", str(DEMO_CLIP), "-o", str(mrd), "--bpp", "0.03",
           "--every", "13", "--json"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads((mrd / "sequence.json").read_text())
    assert [f["kind"] for f in summary["per_frame"]] == ["intra", "inter", "inter", "inter"]
    assert sorted(p.name for p in mrd.glob("*.mrd")) == ["000001.mrd", "000002.mrd", "000003.mrd", "000004.mrd"]
    decode = [sys.executable, "-m", "mridc.cloud.cli", "decode", str(mrd), "-o", str(png), "--realism", "0"]
    result = subprocess.run(decode, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in png.glob("*.png")) == ["000001.png", "000002.png", "000003.png", "000004.png"]
    # An inter frame without its reference is refused with a clear message.
    (mrd / "000001.mrd").unlink()
    result = subprocess.run(decode, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "reference frame 1 is not held" in result.stderr


def test_need_intra_is_raised_for_a_missing_reference(encoder, clip):
    coder = SequenceEncoder(encoder)
    coder.encode(clip[0], 1, 0.05)
    coder.acknowledge(1)
    inter = coder.encode(clip[1], 2, 0.05).bitstream
    with pytest.raises(NeedIntra, match="reference frame 1"):
        SequenceFrames(encoder.prior, model_id=encoder.model_id).token_frame(inter, DEVICE, 2)


# -- scenarios: real broker, real service process, the agent through the link emulator ----------------------
_EDGE_PROCESS = textwrap.dedent(
    """
    import sys
    from mridc.edge.cli import main
    sys.exit(main(["run", *sys.argv[1:]]))
    """
)


@pytest.mark.net
@pytest.mark.timeout(300)
def test_inter_chain_survives_outage_service_restart_and_agent_kill(tmp_path, clip, mosquitto, link_factory):
    """`mridc-edge run --inter` through the link emulator into `mridc-cloud serve`: a link outage (frames and
    acks lost in flight); the service killed with SIGKILL and restarted between references and their inter
    frames (the grids are on disk: no NEED_INTRA); killed again and restarted with its reference grids gone, so it
    answers NEED_INTRA and the agent sends those frames intra; then the agent killed with SIGKILL mid-chain and
    restarted. Every accepted frame is stored exactly once, and inter frames were used."""
    from service_helpers import TESTS_DIR, ServiceProcess

    images = tmp_path / "frames"
    images.mkdir()
    for i, image in enumerate(clip[:8]):
        cv2.imwrite(str(images / f"f{i:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    link = link_factory(mosquitto.port)
    serve = ["--mqtt", mosquitto.url, "--out", str(tmp_path / "cloud"), "--decoder",
             "mridc.lab.synthetic:make_bundle_paint_decoder", "--refine-realism", "0", "--insecure",
             "--worker-id", "seq-worker"]
    log_path = tmp_path / "service.log"
    queue_path = tmp_path / "queue.db"
    edge = [sys.executable, "-c", _EDGE_PROCESS, "--device-id", DEVICE, "--source", str(images), "--loop",
            "--fps", "3", "--bpp", "0.05", "--inter", "--refresh", "0", "--transport",
            f"mqtt://127.0.0.1:{link.port}", "--queue", str(queue_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p))

    def stored() -> list[dict]:
        store = FrameStore(tmp_path / "cloud")
        try:
            return store.query(device_id=DEVICE)
        finally:
            store.close()

    service = ServiceProcess(serve, log_path=log_path, timeout=60)
    agent = subprocess.Popen(edge, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_until(lambda: len(stored()) >= 4, 60), service.log_tail()
        link.set_down("drop")  # everything in flight is lost, then the link comes back
        time.sleep(2.0)
        link.set_up()
        assert wait_until(lambda: len(stored()) >= 7, 60), service.log_tail()
        # A restart between references and their inter frames: the grids are in the index, the chain goes on.
        service.kill()
        time.sleep(1.0)
        service = ServiceProcess(serve, log_path=log_path, timeout=60)
        before = len(stored())
        assert wait_until(lambda: len(stored()) >= before + 3, 60), service.log_tail()
        assert "frame needs intra" not in log_path.read_text()
        # A cloud that lost its references (a new index, a purge): NEED_INTRA, and the agent sends intra.
        service.kill()
        store = FrameStore(tmp_path / "cloud")
        store._db.execute("DELETE FROM reference_grids")
        store.close()
        time.sleep(1.0)
        service = ServiceProcess(serve, log_path=log_path, timeout=60)
        before = len(stored())
        assert wait_until(lambda: len(stored()) >= before + 3, 60), service.log_tail()
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    try:
        second = subprocess.run(edge + ["--max-frames", "4", "--drain-timeout", "60"], check=False,
                                capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 0, second.stderr[-3000:]
        with FrameQueue(queue_path, DEVICE) as queue:
            assert len(queue) == 0
            accepted = queue.next_sequence - 1
        rows = stored()
        assert [r["sequence"] for r in rows] == list(range(1, accepted + 1))  # each once, none missing
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert len([e for e in events if e.get("msg") == "frame stored"]) == accepted  # decoded once each
        assert any(e.get("msg") == "frame needs intra" for e in events)  # and the NEED_INTRA path was taken
        counts = re.search(r"'intra': (\d+), 'inter': (\d+)", second.stderr)
        assert counts and int(counts.group(1)) >= 1 and int(counts.group(2)) >= 1, second.stderr[-2000:]
        assert service.terminate() == 0
    finally:
        service.close()


def test_an_inter_frame_against_the_wrong_reference_is_rejected(tmp_path, encoder, clip):
    """A stream that names a reference the cloud holds but was coded against another grid (a forged or
    confused device): REJECTED with the reason, never decoded against the wrong tokens."""
    from mridc.shared.inter import compress_inter

    config = ServiceConfig(out_dir=tmp_path / "cloud", grpc_addr="127.0.0.1:0", allow_insecure=True,
                           realism=0.0, refine_realism=0.0, decoder="test").validate()
    store = FrameStore(config.out_dir)
    service = DecodeService(config, make_bundle_paint_decoder(), store)
    service.start()
    try:
        coder = SequenceEncoder(encoder)
        first = coder.encode(clip[0], 1, 0.05)
        acks = []

        def submit(sequence, bitstream):
            done = threading.Event()
            service.submit(build_envelope(DEVICE, sequence, bitstream, encoder.model_id), "test",
                           lambda ack: (acks.append(ack), done.set()))
            assert done.wait(20)
            return acks[-1]

        assert submit(1, first.bitstream).status == AckStatus.STORED
        coder.acknowledge(1)
        honest = coder.encode(clip[1], 2, 0.05)
        other = ReferenceGrid(np.zeros(first.grid.shape, np.int64), np.ones(first.grid.shape, bool))
        changes = coder.intra_frame(honest)
        forged = compress_inter(changes, other, 1, encoder.prior)  # names frame 1, coded against another grid
        ack = submit(2, forged)
        assert ack.status == AckStatus.REJECTED and "wrong reference" in ack.reason
        assert submit(3, honest.bitstream).status == AckStatus.STORED  # and serving goes on
    finally:
        service.stop(drain_timeout=5)
        store.close()


def test_sequence_cli_refuses_bad_arguments(tmp_path):
    base = [sys.executable, "-m", "mridc.edge.cli", "encode", str(DEMO_CLIP), "--bpp", "0.02"]
    (tmp_path / "file").write_text("")
    for extra, message in ((["-o", str(tmp_path / "x"), "--every", "0"], "--every must be >= 1"),
                           (["-o", str(tmp_path / "file")], "is not a folder"),
                           (["-o", str(tmp_path / "y"), "--slice-bytes", "200"], "inter frames are not sliced")):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "mridc.edge.cli", "encode", str(DEMO_CLIP), "-o",
                             str(tmp_path / "z")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "needs --bpp" in result.stderr
