"""Scene adaptation: the adaptation core on tiny models, calibration stills (validation, queue, schedule), and
the whole path with a real broker, the real service and the shipped models: stills sent, adaptation run,
weights swapped, later frames decoded with them, and the weights kept across a service restart."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mridc.cloud.adapt import (
    AdaptConfig,
    CalibrationPair,
    adapt_decoder,
    adapted_tokenizer,
    load_adapter,
    pick_frames,
    save_adapter,
    trainable_names,
)
from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
from mridc.cloud.zoo import ModelFileError
from mridc.edge.calibration import CalibrationScheduler, encode_still
from mridc.edge.config import CalibrationSection
from mridc.edge.queue import CALIBRATION, FrameQueue
from mridc.shared.protocol import build_calibration
from mridc.v1 import mridc_pb2

DEVICE = "cam-scene"


def scene_frame(i: int, w: int = 256, h: int = 192) -> np.ndarray:
    """A fixed, sepia-toned scene (off the base models' photo prior) with one bright block moving right."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    g = 0.35 + 0.3 * np.sin(x / 23.0) * np.cos(y / 17.0) + 0.15 * (x / w)
    for _ in range(12):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 30)
        g[y0:y0 + rng.integers(10, 30), x0:x0 + rng.integers(10, 40)] = rng.uniform(0.1, 0.9)
    g = np.clip(g + rng.normal(0, 0.03, g.shape) * 0, 0, 1)
    g[80:120, 20 + 12 * i:56 + 12 * i] = 0.95
    return (np.stack([g, g * 0.82, g * 0.62], -1) * 255).astype(np.uint8)


# -- the adaptation core, on a tiny tokenizer ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tok():
    torch.manual_seed(0)
    return VQTokenizer(tiny_tokenizer_config()).eval()


def _pairs(tok, n: int, seed: int) -> list[CalibrationPair]:
    """Latents from the tiny tokenizer's encoder and, as targets, images with a colour cast it never saw."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        image = torch.rand(1, 3, 64, 64, generator=g) * 0.2 + torch.tensor([0.6, -0.2, -0.6])[None, :, None, None]
        with torch.no_grad():
            latent = tok.quantizer.lookup(tok.encode_indices(image))
        pairs.append(CalibrationPair(latent[0], image[0].clamp(-1, 1), 0.03, 100))
    return pairs


def test_trainable_subsets_are_nested_and_tail_is_small(tiny_tok):
    dec = tiny_tok.decoder
    norms, tail, every = (set(trainable_names(dec, p)) for p in ("norms", "tail", "all"))
    assert norms < tail < every == {n for n, _ in dec.named_parameters()}
    assert all(n.endswith(".bias") or "norm" in n for n in norms)
    with pytest.raises(ValueError):
        trainable_names(dec, "everything")


def test_adaptation_improves_the_held_out_pair_and_leaves_the_base_alone(tiny_tok):
    before = {k: v.clone() for k, v in tiny_tok.decoder.state_dict().items()}
    result = adapt_decoder(tiny_tok.decoder, _pairs(tiny_tok, 4, 1), _pairs(tiny_tok, 1, 2),
                           AdaptConfig(minutes=0, steps=60, crop_tokens=4, batch=2, lr=3e-3, eval_every=20),
                           tiny_tok.cfg.stride)
    assert all(torch.equal(before[k], v) for k, v in tiny_tok.decoder.state_dict().items())
    assert result.accepted and result.adapted_psnr > result.base_psnr + 0.5
    assert set(result.state) == set(trainable_names(tiny_tok.decoder, "tail"))
    assert [h["step"] for h in result.history] == [0, 20, 40, 60]


def test_a_result_that_is_not_better_by_the_margin_is_not_accepted(tiny_tok):
    result = adapt_decoder(tiny_tok.decoder, _pairs(tiny_tok, 2, 1), _pairs(tiny_tok, 1, 2),
                           AdaptConfig(minutes=0, steps=5, crop_tokens=4, batch=2, min_gain_db=100.0),
                           tiny_tok.cfg.stride)
    assert not result.accepted


def test_adapter_files_round_trip_and_refuse_another_decoder(tiny_tok, tmp_path):
    result = adapt_decoder(tiny_tok.decoder, _pairs(tiny_tok, 2, 1), _pairs(tiny_tok, 1, 2),
                           AdaptConfig(minutes=0, steps=10, crop_tokens=4, batch=2, lr=3e-3, eval_every=5),
                           tiny_tok.cfg.stride)
    meta = save_adapter(tmp_path / "adapter.pt", result.state, {"model_id": 7})
    state, loaded = load_adapter(tmp_path / "adapter.pt")
    assert loaded["version"] == meta["version"] and meta["bytes"] == (tmp_path / "adapter.pt").stat().st_size
    adapted = adapted_tokenizer(tiny_tok, state)
    latent = _pairs(tiny_tok, 1, 3)[0].latent[None]
    with torch.no_grad():
        assert not torch.allclose(adapted.decoder(latent), tiny_tok.decoder(latent))
    with pytest.raises(ModelFileError, match="lacks"):
        adapted_tokenizer(tiny_tok, {"stages.9.weight": torch.zeros(1)})
    name = next(iter(state))
    with pytest.raises(ModelFileError, match="shape"):
        adapted_tokenizer(tiny_tok, {name: torch.zeros(3, 3, 3, 3, 3)})


def test_pick_frames_spreads_and_keeps_both_ends():
    assert pick_frames(list(range(100)), 5) == [0, 25, 50, 74, 99]
    assert pick_frames([1, 2], 5) == [1, 2]


def test_a_scene_folder_decodes_through_from_models_and_refuses_another_model(tmp_path):
    """`mridc-cloud decode --models SCENE` (open_decoder): the folder's adapter on top of its recorded base."""
    from mridc.cloud.adapt import ADAPTER_FILE, SCENE_FILE, open_decoder
    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.shared.zoo import default_models_dir

    base = MRIDCDecoder.from_models(with_predictor=False, with_diffusion=False, backend="torch")
    names = trainable_names(base.tokenizer.decoder, "norms")
    state = {n: t.detach() + 0.05 for n, t in base.tokenizer.decoder.state_dict().items() if n in names}
    save_adapter(tmp_path / ADAPTER_FILE, state, {"model_id": base.model_id})
    (tmp_path / SCENE_FILE).write_text(json.dumps({"base_models": str(default_models_dir())}))
    scene = open_decoder(tmp_path, with_predictor=False, with_diffusion=False, backend="torch")
    assert scene.adapter_version and scene.model_id == base.model_id
    latent = torch.randn(1, base.tokenizer.cfg.code_dim, 3, 4)
    assert not torch.allclose(scene.decode_latent(latent), base.decode_latent(latent))
    save_adapter(tmp_path / ADAPTER_FILE, state, {"model_id": base.model_id ^ 1})
    with pytest.raises(ModelFileError, match="adapter is for model"):
        open_decoder(tmp_path, with_predictor=False, with_diffusion=False, backend="torch")


# -- calibration stills: validation ----------------------------------------------------------------------------
def _still(model_id=5, w=64, h=48, device=DEVICE, sequence=3, fmt="jpeg", **changes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(scene_frame(0, w, h)).save(buf, format="JPEG" if fmt == "jpeg" else fmt.upper())
    msg = build_calibration(device, sequence, buf.getvalue(), fmt, w, h, model_id)
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg.SerializeToString()


@pytest.mark.parametrize(("payload", "code"), [
    (b"\xff" * 10, "malformed"),
    (_still(model_id=6), "wrong_model"),
    (_still(device="cam-other"), "not_allowed"),
    (_still(width=65), "bad_size"),
    (_still(width=100_000, height=100_000), "bad_size"),
    (_still(content_hash=b"\0" * 32), "hash_mismatch"),
    (_still(format="gif"), "bad_format"),
    (_still(sequence=0), "bad_sequence"),
])
def test_calibration_stills_that_are_rejected(payload, code):
    from mridc.cloud.service.calibration import CalibrationRejected, validate_calibration

    with pytest.raises(CalibrationRejected) as info:
        validate_calibration(payload, max_bytes=1_000_000, known_model_ids={5}, topic_device=None,
                             allowed_devices={DEVICE})
    assert info.value.code == code


def test_calibration_still_checks_size_topic_and_pixels():
    from mridc.cloud.service.calibration import CalibrationRejected, validate_calibration

    ok = validate_calibration(_still(), max_bytes=1_000_000, known_model_ids={5}, topic_device=DEVICE,
                              allowed_devices=None)
    assert ok.image.shape == (48, 64, 3)
    for kwargs, code in (({"max_bytes": 100}, "too_large"), ({"topic_device": "cam-x"}, "topic_mismatch")):
        args = {"max_bytes": 1_000_000, "known_model_ids": {5}, "topic_device": DEVICE, "allowed_devices": None}
        with pytest.raises(CalibrationRejected) as info:
            validate_calibration(_still(), **{**args, **kwargs})
        assert info.value.code == code
    # a forged file: right hash and header size, but the bytes after the header are garbage
    good = mridc_pb2.CalibrationFrame.FromString(_still())
    broken = build_calibration(DEVICE, 4, good.image[:200] + b"\0" * 50, "jpeg", 64, 48, 5).SerializeToString()
    with pytest.raises(CalibrationRejected) as info:
        validate_calibration(broken, max_bytes=1_000_000, known_model_ids={5}, topic_device=None,
                             allowed_devices=None)
    assert info.value.code == "bad_image"


# -- calibration stills on the device ---------------------------------------------------------------------------
def test_stills_queue_behind_live_frames_and_are_dropped_first(tmp_path):
    q = FrameQueue(tmp_path / "q.db", DEVICE, max_frames=3)
    still = q.put(b"still", kind=CALIBRATION, meta={"format": "jpeg", "width": "2", "height": "2"}).sequence
    live = [q.put(b"live%d" % i).sequence for i in range(2)]
    assert [f.sequence for f in q.pending(8)] == [*live, still]
    assert q.pending(8)[-1].kind == CALIBRATION and q.pending(8)[-1].to_calibration().width == 2
    dropped = q.put(b"live2").dropped
    assert dropped == (still,)  # full: the still goes, not the oldest live frame
    with pytest.raises(ValueError):
        q.put(b"x", kind="thumbnail")


def test_the_schedule_takes_rounds_at_startup_on_a_period_and_on_request():
    now = [0.0]
    sched = CalibrationScheduler(CalibrationSection(enabled=True, frames=2, every_frames=3, interval_s=100),
                                 clock=lambda: now[0])
    assert [sched.due() for _ in range(6)] == ["startup", None, None, "startup", None, None]
    sched.request()
    assert [sched.due() for _ in range(4)] == ["request", None, None, "request"]
    now[0] = 150.0
    assert sched.due() == "schedule"
    off = CalibrationScheduler(CalibrationSection(enabled=False))
    off.request()
    assert off.due() is None


def test_a_still_fits_its_byte_budget():
    frame = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    data, w, h = encode_still(frame, 20_000, 90)
    assert len(data) <= 20_000 and Image.open(io.BytesIO(data)).size == (w, h)
    assert (w, h) != (640, 480)  # noise does not fit at quality 40: it was downscaled


# -- the whole path: broker, service, agent, adaptation, swap, restart -----------------------------------------
def _metric(worker, name: str, **labels) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_stills_adapt_the_service_decoder_which_survives_a_restart(tmp_path, mosquitto, capsys):
    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.cloud.service.config import ServiceConfig
    from mridc.cloud.service.server import Worker
    from mridc.edge.agent import EdgeAgent
    from mridc.edge.capture import open_source
    from mridc.edge.encoder import EdgeEncoder
    from mridc.edge.transport import open_transport

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(8):
        Image.fromarray(scene_frame(i)).save(frames / f"{i:03d}.png")
    decoder = MRIDCDecoder.from_models(with_diffusion=False, backend="torch")

    def service(worker_id: str) -> Worker:
        config = ServiceConfig(out_dir=tmp_path / "cloud", mqtt_url=mosquitto.url, realism=0.0, refine_realism=0.5,
                               worker_id=worker_id,
                               adapt=True, adapt_min_stills=3, adapt_steps=20, adapt_minutes=5, adapt_threads=1,
                               adapt_request_s=3600).validate()
        worker = Worker(config, decoder)
        worker.start()
        return worker

    def agent(first: int, count: int) -> dict:
        source = open_source(str(frames), fps=0)
        images = [f for f in source][first:first + count]
        bot = EdgeAgent(device_id=DEVICE, encoder=EdgeEncoder.from_bundle(), transport=open_transport(
                        mosquitto.url, DEVICE), queue=FrameQueue(tmp_path / "queue.db", DEVICE), source=images,
                        bpp=0.03, calibration=CalibrationSection(enabled=True, frames=3, every_frames=1,
                                                                 at_startup=first == 0, interval_s=0))
        return bot.run(drain_timeout_s=60)

    worker = service("adapt-a")
    try:
        first = agent(0, 4)  # 4 live frames, the first 3 also sent as stills
        assert first["undelivered"] == [] and first["agent"]["calibration"] == 3
        adapters = worker.service.adapters
        _wait(lambda: adapters.version_for(DEVICE) != "base" and not adapters.running(DEVICE), 240, "adaptation")
        version = adapters.version_for(DEVICE)
        assert _metric(worker, "mridc_calibration_frames_total", result="stored") == 3
        assert _metric(worker, "mridc_adaptations_total", result="accepted") == 1
        assert _metric(worker, "mridc_device_adapter", device=DEVICE, version=version) == 1
        run = adapters.last_run(DEVICE)
        assert run["result"] == "accepted" and run["held_out_psnr_after"] > run["held_out_psnr_before"]
        second = agent(4, 2)  # later frames: decoded with the adapted decoder
        assert second["undelivered"] == []
    finally:
        worker.stop(drain_timeout=5)
    from mridc.cloud.service.store import open_store_readonly

    store = open_store_readonly(tmp_path / "cloud")
    rows = store.query(DEVICE, None, None, None)
    store.close()
    # live frames and stills share the sequence space: live 1, still 2, live 3, still 4, live 5, still 6, ...
    assert sorted(r["sequence"] for r in rows) == [1, 3, 5, 7, 8, 9]  # each live frame stored exactly once
    sidecars = {r["sequence"]: json.loads((tmp_path / "cloud" / r["sidecar_path"]).read_text()) for r in rows}
    used = [s["decode"]["adapter"] for _, s in sorted(sidecars.items())]
    assert used[:4] == ["base"] * 4 and used[4:] == [version] * 2
    # the refiner is not adapted: base decodes are previews to refine, adapted ones are final at once
    stages = [s["stage"] for _, s in sorted(sidecars.items())]
    assert set(stages[:4]) <= {"preview", "refined"} and stages[4:] == ["final"] * 2
    restarted = service("adapt-b")  # a restart (a new process, here a new worker) keeps the adapted weights
    try:
        assert restarted.service.adapters.version_for(DEVICE) == version
    finally:
        restarted.stop(drain_timeout=5)
    from mridc.cloud.service.cli import main as service_cli

    service_cli(["frames", "--out", str(tmp_path / "cloud"), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    state = next(line for line in lines if line.get("adaptation") == DEVICE)
    model = next(iter(state["models"].values()))
    assert state["stills"] == 3 and model["version"] == version and model["last_run"]["result"] == "accepted"


def test_a_failing_adaptation_run_never_stops_decoding(tmp_path):
    """The run's child process fails (here: it is not Python at all); the run is recorded as failed, the
    device keeps the base decoder, and frames still decode."""
    from mridc.cloud.service.adaptation import AdaptationSettings, SceneAdapters
    from mridc.lab.synthetic import TokenPaintDecoder

    base = TokenPaintDecoder()
    adapters = SceneAdapters(base, AdaptationSettings(root=tmp_path / "adaptation", min_stills=2, minutes=0.1),
                             python="/bin/false")
    still = mridc_pb2.CalibrationFrame.FromString(_still()).image
    assert adapters.add_still(DEVICE, 1, still, "jpeg") and not adapters.add_still(DEVICE, 1, still, "jpeg")
    assert adapters.add_still(DEVICE, 2, still, "jpeg")
    assert adapters.wait_idle(30)
    assert adapters.last_run(DEVICE)["result"] == "failed"
    assert adapters.decoder_for(DEVICE) is base and adapters.version_for(DEVICE) == "base"
    assert not (adapters.scene_dir(DEVICE) / ".adapting").exists()


# -- fuzzing the still parser ------------------------------------------------------------------------------------
_VALID_STILL = _still()


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=3000), position=st.integers(0, 10**6), flip=st.integers(1, 255),
       cut=st.integers(0, 10**6))
def test_the_still_parser_only_ever_rejects_random_mutated_or_cut_messages(payload, position, flip, cut):
    """Random bytes, a valid still with one byte changed, and a valid still cut short: each is accepted or
    rejected with a code; nothing else is raised."""
    from mridc.cloud.service.calibration import CalibrationRejected, validate_calibration

    mutated = bytearray(_VALID_STILL)
    mutated[position % len(mutated)] ^= flip
    for data in (payload, bytes(mutated), _VALID_STILL[:cut % len(_VALID_STILL)]):
        try:
            ok = validate_calibration(data, max_bytes=1_000_000, known_model_ids={5}, topic_device=None,
                                      allowed_devices=None)
        except CalibrationRejected as exc:
            assert exc.code
        else:
            assert ok.image.ndim == 3 and ok.image.shape[2] == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_the_service_acks_every_still_exactly_once(tmp_path, position, flip):
    """Through DecodeService.submit_calibration: valid, mutated and oversized stills each get exactly one ack,
    and each is counted under one result."""
    from mridc.cloud.service.adaptation import AdaptationSettings, SceneAdapters
    from mridc.cloud.service.config import ServiceConfig
    from mridc.cloud.service.store import FrameStore
    from mridc.cloud.service.worker import DecodeService
    from mridc.lab.synthetic import TokenPaintDecoder

    decoder = TokenPaintDecoder(model_id=5)
    config = ServiceConfig(out_dir=tmp_path / "cloud", mqtt_url="mqtt://127.0.0.1:1", adapt=True,
                           calibration_max_bytes=len(_VALID_STILL) + 8).validate()
    store = FrameStore(config.out_dir)
    adapters = SceneAdapters(decoder, AdaptationSettings(root=config.out_dir / "adaptation", run=False))
    service = DecodeService(config, decoder, store, adapters=adapters)
    mutated = bytearray(_VALID_STILL)
    mutated[position % len(mutated)] ^= flip
    acks = []
    for data in (_VALID_STILL, bytes(mutated), _VALID_STILL + b"\0" * 64):
        before = len(acks)
        service.submit_calibration(data, "test", acks.append, topic_device=DEVICE)
        assert len(acks) == before + 1
    assert acks[0].status == mridc_pb2.FrameAck.STORED or acks[0].status == mridc_pb2.FrameAck.DUPLICATE
    assert acks[2].status == mridc_pb2.FrameAck.REJECTED and "too_large" in acks[2].reason
    store.close()


def test_stills_are_refused_and_counted_when_adaptation_is_off_or_the_device_may_not(tmp_path):
    from mridc.cloud.service.adaptation import AdaptationSettings, SceneAdapters
    from mridc.cloud.service.config import ServiceConfig
    from mridc.cloud.service.store import FrameStore
    from mridc.cloud.service.worker import DecodeService
    from mridc.lab.synthetic import TokenPaintDecoder

    decoder = TokenPaintDecoder(model_id=5)
    for adapt, code in ((False, "disabled"), (True, "not_allowed")):
        config = ServiceConfig(out_dir=tmp_path / f"cloud-{adapt}", mqtt_url="mqtt://127.0.0.1:1", adapt=adapt,
                               calibration_devices="cam-01,cam-02").validate()
        store = FrameStore(config.out_dir)
        adapters = SceneAdapters(decoder, AdaptationSettings(root=config.out_dir / "adaptation", run=False)) \
            if adapt else None
        service = DecodeService(config, decoder, store, adapters=adapters)
        acks = []
        service.submit_calibration(_still(), "test", acks.append, topic_device=DEVICE)
        assert [a.status for a in acks] == [mridc_pb2.FrameAck.REJECTED] and code in acks[0].reason
        assert acks[0].sequence == 3  # the still's own sequence, so the device drops it from its queue
        assert service.metrics.registry.get_sample_value("mridc_calibration_frames_total", {"result": code}) == 1
        store.close()
