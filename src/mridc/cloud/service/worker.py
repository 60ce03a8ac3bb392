"""The transport-independent core of a worker: admit a frame, queue it, decode in batches, store, ack.

Progressive delivery (`refine_realism` > `realism`): the first decode is the cheap preview; it is stored,
acked and announced at once, and the refined decode replaces it later, when no live frame waits. The
refinement is durable work in the shared index (the stream is kept beside the PNG), so a worker that dies
leaves it to the others, and it never delays a live frame by more than one refinement.

Both ingest paths (MQTT and gRPC) call `DecodeService.submit(envelope, transport, done)`. `done(ack)` is
called exactly once per submission: immediately for a rejected, duplicate, busy or rate-limited frame, and
only after the PNG, sidecar and index row are durable for a decoded one. The MQTT ingest acks the broker
message inside `done`, which is what makes a worker that dies mid-decode lose nothing.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError

from mridc.cloud.sequence import NeedIntra
from mridc.shared.protocol import build_ack as make_ack
from mridc.v1 import mridc_pb2

from .config import ServiceConfig
from .metrics import ServiceMetrics
from .ratelimit import DeviceRateLimiter
from .store import BUSY, DUPLICATE, FINAL, PREVIEW, ClaimLost, FrameStore, StoredFrame, encode_png
from .validation import FrameRejected, Limits, ValidFrame, validate_envelope

log = logging.getLogger("mridc.cloud.service")

Ack = mridc_pb2.FrameAck
AckCallback = Callable[[mridc_pb2.FrameAck], None]


class FrameDecoder(Protocol):
    """What the service needs from a decoder (mridc.cloud.pipeline.MRIDCDecoder satisfies it)."""

    def validate(self, bitstream: bytes) -> Any: ...  # bytes -> TokenFrame, or a ValueError

    # The TokenFrames that `validate` returned -> one output with an `.image` (HxWx3 uint8) each: a frame's
    # stream is parsed once, not again to decode.
    def decode_frames(self, frames: Sequence[Any], settings: Any = None) -> list[Any]: ...


def load_decoder(spec: str, models_dir=None, device: str = "cpu", backend: str = "auto") -> FrameDecoder:
    """"mridc" -> MRIDCDecoder.from_models; "package.module:factory" -> factory(models_dir=, device=)."""
    if spec == "mridc":
        from mridc.cloud.adapt import open_decoder

        return open_decoder(models_dir, device=device, backend=backend)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"decoder must be 'mridc' or 'module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(models_dir=models_dir, device=device)


@dataclass
class DecodeJob:
    frame: ValidFrame
    transport: str
    received_mono: float
    callbacks: list[AckCallback] = field(default_factory=list)
    slices: tuple[list[int], int] | None = None  # (slice indexes held, slice count) of a frame that came sliced
    update: bool = False  # replaces a stored version decoded from fewer slices

    @property
    def key(self) -> tuple[str, int]:
        return self.frame.envelope.device_id, self.frame.envelope.sequence


class DecodeQueue:
    """Bounded FIFO. `put(job, wait=None)` always admits (the MQTT lane, bounded by the broker's Receive
    Maximum); `put(job, wait=s)` waits up to s seconds for room and returns False when there is none."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.deque[DecodeJob] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, job: DecodeJob, wait: float | None = None) -> bool:
        with self._cond:
            if wait is not None:
                deadline = time.monotonic() + wait
                while len(self._items) >= self.capacity and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            self._items.append(job)
            self._cond.notify_all()
            return True

    def get_batch(self, max_items: int, wait_s: float, idle_timeout: float = 0.2) -> list[DecodeJob]:
        """Up to max_items jobs: waits idle_timeout for the first, then up to wait_s for the batch to fill."""
        with self._cond:
            if not self._items:
                self._cond.wait(idle_timeout)
                if not self._items:
                    return []
            deadline = time.monotonic() + wait_s
            while len(self._items) < max_items and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class DecodeService:
    def __init__(self, config: ServiceConfig, decoder: FrameDecoder, store: FrameStore,
                 metrics: ServiceMetrics | None = None, *, instance: str | None = None, adapters=None):
        self.config = config
        self.decoder = decoder
        # Scene adaptation (mridc.cloud.service.adaptation.SceneAdapters): each device's decoder; None: off.
        self.adapters = adapters
        self._decoded_with: dict[tuple[str, int], str] = {}  # (device, sequence) -> decoder version used
        self.store = store
        self.metrics = metrics or ServiceMetrics()
        self.instance = instance or f"{config.worker_id}:{time.time_ns()}"
        self.limits = Limits(config.max_payload_bytes, config.max_bitstream_bytes, config.max_meta_bytes)
        self.known_model_ids = getattr(decoder, "model_ids", None)
        if self.known_model_ids is None and isinstance(getattr(decoder, "model_id", None), int):
            self.known_model_ids = frozenset({decoder.model_id})
        self.rate_limiter = DeviceRateLimiter(config.rate_limit_fps, config.rate_limit_burst)
        self.queue = DecodeQueue(config.queue_size)
        self.decoder_lock = threading.Lock()  # the batch loop and the Decode RPC share one decoder
        self._inflight: dict[tuple[str, int], DecodeJob] = {}
        self._inflight_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.decoded_count = 0
        self.refined_count = 0
        # Progressive: previews are stored to be refined. `refining` switches the refinement loop itself
        # (tests, or an operator pausing it); previews wait durably in the index meanwhile.
        self.progressive = config.refine_realism > config.realism
        self.refining = self.progressive
        # Called with each StoredFrame once its picture is durable (preview, refined or final): the MQTT
        # ingest publishes it as an event.
        self.picture_listeners: list[Callable[[StoredFrame], None]] = []
        self._refine_hint = threading.Event()
        self._next_refine_scan = 0.0
        # (device, sequence) -> this worker's preview DecodeOutput with its intermediates, so that refining a
        # preview it just made runs the refiner only. Bounded; a miss (another worker's preview, a restart)
        # decodes from the stored stream instead.
        self._previews: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
        self._previews_max = 2 * config.queue_size
        # Inter frames (fixed cameras): every frame's token grid is kept in the shared index as a reference;
        # an inter frame is parsed against its reference there. Needs the decoder's token prior.
        self.sequences = None
        prior = getattr(decoder, "prior", None)
        if prior is not None:
            from mridc.cloud.sequence import SequenceFrames

            self.sequences = SequenceFrames(prior, model_id=getattr(decoder, "model_id", None),
                                            references=store.references)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.register_instance(self.instance, self.config.worker_id)
        if self.adapters is not None:
            self.adapters.start()
        for target, name in ((self._decode_loop, "decode"), (self._heartbeat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"mridc-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish what is queued (up to drain_timeout), then stop the threads."""
        deadline = time.monotonic() + drain_timeout
        while (len(self.queue) or self._inflight) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.adapters is not None:
            self.adapters.stop()  # a run in progress goes on in its child process and is picked up next start

    # -- admission ---------------------------------------------------------------------------------------
    def submit(self, envelope: mridc_pb2.FrameEnvelope, transport: str, done: AckCallback, *,
               topic_device: str | None = None, authenticated_device: str | None = None,
               payload_bytes: int | None = None, wait: float | None = None,
               slices: tuple[list[int], int] | None = None, update: bool = False) -> None:
        """Admit one frame. `slices` (datagram ingest): which slices of the frame its bitstream holds. `update`:
        the frame is stored already, decoded from fewer slices; this version replaces it (no claim: the store
        keeps whichever version holds the most slices)."""
        self.metrics.frames_in.labels(transport).inc()
        device, sequence = envelope.device_id, envelope.sequence
        ack_device = topic_device or authenticated_device or device
        try:
            frame = validate_envelope(envelope, self.limits, lambda data: self._validate(data, device, sequence),
                                      known_model_ids=self.known_model_ids, topic_device=topic_device,
                                      authenticated_device=authenticated_device, payload_bytes=payload_bytes)
        except FrameRejected as exc:
            self._reject(ack_device, sequence, exc, done, transport)
            return
        except NeedIntra as exc:  # an inter frame whose reference is not held here: the device resends it intra
            self.metrics.frames_need_intra.inc()
            log.info("frame needs intra", extra={"fields": {"device": device, "sequence": sequence,
                                                            "reference": exc.ref_sequence, "transport": transport}})
            done(make_ack(ack_device, sequence, Ack.NEED_INTRA, str(exc)))
            return
        self.metrics.device_bytes.labels(device).inc(len(envelope.bitstream))
        key = (device, sequence)
        if update:
            stored = self.store.stored_slices(device, sequence)
            if stored is None:
                update = False  # not stored (any more): an ordinary first decode
            elif slices is None or stored[0] >= len(slices[0]):
                self.metrics.frames_duplicate.inc()
                done(make_ack(device, sequence, Ack.DUPLICATE, "a version with as many slices is stored"))
                return
        with self._inflight_lock:
            job = self._inflight.get(key)
            if job is not None:  # the same frame again while this worker is still decoding it
                job.callbacks.append(done)
                return
            if update:
                job = DecodeJob(frame, transport, time.monotonic(), [done], slices, update=True)
                self._inflight[key] = job
            else:
                job = self._claim_job(frame, transport, done, slices)
                if job is None:
                    return
        if not self.queue.put(job, wait=wait):
            with self._inflight_lock:
                self._inflight.pop(key, None)
                if not job.update:
                    self.store.release(device, sequence, self.instance)
            self._finish(job, make_ack(device, sequence, Ack.RETRY_LATER, "decode queue full"))
            return
        self.metrics.queue_depth.set(len(self.queue))

    # -- calibration stills (scene adaptation) -------------------------------------------------------------
    def submit_calibration(self, payload: bytes, transport: str, done: AckCallback, *,
                           topic_device: str | None = None) -> None:
        """Admit one calibration still: validate, keep it durably, ack (STORED, DUPLICATE or REJECTED).
        `done(ack)` is called exactly once, after the still is on disk when it is kept."""
        from .calibration import CalibrationRejected, validate_calibration

        ack_device = topic_device or "?"
        try:
            if self.adapters is None:
                raise CalibrationRejected("disabled", "scene adaptation is off on this service (serve --adapt)")
            valid = validate_calibration(payload, max_bytes=self.config.calibration_max_bytes,
                                         known_model_ids=self.known_model_ids, topic_device=topic_device,
                                         allowed_devices=self.config.calibration_allowed)
        except CalibrationRejected as exc:
            self.metrics.calibration_frames.labels(exc.code).inc()
            log.warning("calibration still rejected", extra={"fields": {"device": ack_device, "reason": exc.code,
                                                                        "detail": exc.detail,
                                                                        "transport": transport}})
            try:  # the still's own sequence, so that the device drops it from its queue
                sequence = mridc_pb2.CalibrationFrame.FromString(payload).sequence
            except DecodeError:
                sequence = 0
            done(make_ack(ack_device, sequence, Ack.REJECTED, f"{exc.code}: {exc.detail}"))
            return
        msg = valid.message
        try:
            kept = self.adapters.add_still(msg.device_id, msg.sequence, msg.image, msg.format)
        except OSError as exc:  # not kept, not acked: the device sends it again
            log.exception("calibration still not stored")
            done(make_ack(msg.device_id, msg.sequence, Ack.RETRY_LATER, f"store failed: {exc}"[:200]))
            return
        result = "stored" if kept else "duplicate"
        self.metrics.calibration_frames.labels(result).inc()
        log.info("calibration still " + result, extra={"fields": {
            "device": msg.device_id, "sequence": msg.sequence, "bytes": len(msg.image), "reason": msg.reason,
            "stills": self.adapters.still_count(msg.device_id)}})
        done(make_ack(msg.device_id, msg.sequence, Ack.STORED if kept else Ack.DUPLICATE))

    def decoder_for(self, device: str) -> FrameDecoder:
        """The decoder of this device's frames: its scene-adapted one if it has one, else the base."""
        return self.adapters.decoder_for(device) if self.adapters is not None else self.decoder

    def _validate(self, data: bytes, device: str, sequence: int) -> Any:
        """The decoder's cheap parse; an inter frame is parsed against its reference (NeedIntra if absent), and
        every frame's grid is kept as a reference for the inter frames that may follow it."""
        if self.sequences is None:
            return self.decoder.validate(data)
        from mridc.shared.inter import ReferenceGrid, is_inter

        if is_inter(data):
            frame = self.sequences.token_frame(data, device, sequence)
            check_size = getattr(self.decoder, "check_size", None)
            if check_size is not None:
                check_size(frame)
            return frame
        frame = self.decoder.validate(data)
        self.sequences.references[(device, sequence)] = ReferenceGrid.from_frame(frame)
        return frame

    def _claim_job(self, frame: ValidFrame, transport: str, done: AckCallback,
                   slices: tuple[list[int], int] | None) -> DecodeJob | None:
        """Claim a first decode in the shared index (under the in-flight lock); None when answered already."""
        device, sequence = frame.envelope.device_id, frame.envelope.sequence
        claim = self.store.claim(device, sequence, self.instance)
        if claim == DUPLICATE:
            self.metrics.frames_duplicate.inc()
            done(make_ack(device, sequence, Ack.DUPLICATE, "already stored"))
            return None
        if claim == BUSY:
            self.metrics.frames_busy.inc()
            done(make_ack(device, sequence, Ack.RETRY_LATER, "being decoded by another worker"))
            return None
        if not self.rate_limiter.allow(device):
            self.store.release(device, sequence, self.instance)
            self.metrics.rate_limited.inc()
            done(make_ack(device, sequence, Ack.RETRY_LATER, "rate limited"))
            return None
        job = DecodeJob(frame, transport, time.monotonic(), [done], slices)
        self._inflight[(device, sequence)] = job
        return job

    def _reject(self, device: str, sequence: int, exc: FrameRejected, done: AckCallback, transport: str) -> None:
        self.metrics.frames_rejected.labels(exc.code).inc()
        log.warning("frame rejected", extra={"fields": {"device": device, "sequence": sequence,
                                                         "reason": exc.code, "detail": exc.detail,
                                                         "transport": transport}})
        done(make_ack(device, sequence, Ack.REJECTED, f"{exc.code}: {exc.detail}"))

    def _finish(self, job: DecodeJob, ack: mridc_pb2.FrameAck) -> None:
        with self._inflight_lock:
            self._inflight.pop(job.key, None)
            callbacks = list(job.callbacks)
        for callback in callbacks:
            try:
                callback(ack)
            except Exception:  # one broken transport must not stop the decode loop
                log.exception("ack callback failed")

    # -- decoding ----------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.store.heartbeat(self.instance)
            except Exception:
                log.exception("heartbeat failed")

    def _decode_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.queue.get_batch(self.config.batch_size, self.config.batch_wait_ms / 1000)
            self.metrics.queue_depth.set(len(self.queue))
            if batch:
                self._decode_batch(batch)
            elif self.refining:  # live frames first: refine only when none waits
                self._refine_next()

    def _announce(self, record: StoredFrame) -> None:
        for listener in self.picture_listeners:
            try:
                listener(record)
            except Exception:
                log.exception("picture listener failed")

    def _refine_next(self) -> None:
        now = time.monotonic()
        if now < self._next_refine_scan and not self._refine_hint.is_set():
            return
        self._refine_hint.clear()
        keys = self.store.claim_refinement(self.instance, limit=1)
        if not keys:
            self._next_refine_scan = now + 1.0  # nothing left: look again in a second (or on a new preview)
            self.metrics.refine_backlog.set(0)
            return
        device, sequence = keys[0]
        start = time.monotonic()
        with self._inflight_lock:
            preview = self._previews.pop((device, sequence), None)
        try:
            settings = self.decode_settings(realism=self.config.refine_realism)
            if preview is not None:  # this worker's own preview: the refiner alone
                with self.decoder_lock:
                    image = self.decoder.refine_outputs([preview], settings)[0].image
            else:
                frame = self.decoder.validate(self.store.load_bitstream(device, sequence))
                with self.decoder_lock:
                    image = self.decoder_for(device).decode_frames([frame], settings)[0].image
            refine_s = time.monotonic() - start
            decode = self.decode_info(settings.realism) | {"refine_s": round(refine_s, 4),
                                                           "from_preview": preview is not None}
            if self.adapters is not None:
                decode["adapter"] = self.adapters.version_for(device)
            record = self.store.put_refined(device, sequence, self.instance, encode_png(image), decode)
        except ClaimLost as exc:
            log.info("refinement discarded", extra={"fields": {"device": device, "sequence": sequence,
                                                               "reason": str(exc)}})
            return
        except (OSError, ValueError) as exc:  # the stream is gone or no longer decodes: the preview stays
            log.warning("refinement abandoned", extra={"fields": {"device": device, "sequence": sequence,
                                                                  "reason": f"{type(exc).__name__}: {exc}"}})
            self.metrics.refines_failed.inc()
            self.store.abandon_refinement(device, sequence, self.instance, f"{type(exc).__name__}: {exc}"[:200])
            return
        except Exception:
            log.exception("refinement failed", extra={"fields": {"device": device, "sequence": sequence}})
            self.metrics.refines_failed.inc()
            self.store.abandon_refinement(device, sequence, self.instance, "internal error")
            return
        self.refined_count += 1
        self.metrics.frames_refined.inc()
        self.metrics.refine_seconds.observe(refine_s)
        self.metrics.capture_to_refined_seconds.observe(
            max(0.0, record.versions["refined"]["stored_at"] - record.capture_time_us / 1e6))
        log.info("frame refined", extra={"fields": {"device": device, "sequence": sequence,
                                                    "refine_s": round(refine_s, 4),
                                                    "worker_id": self.config.worker_id}})
        self._announce(record)
        self._refine_hint.set()  # there may be more: look again at once

    def decode_info(self, realism: float) -> dict:
        return {"decoder": self.config.decoder, "realism": realism, "seed": self.config.seed,
                "steps": self.config.steps, "device": self.config.device,
                "backend": getattr(self.decoder, "backend", None)}

    def _decode_record(self, device: str, sequence: int) -> dict:
        """The sidecar's decode settings, with the decoder version that made the picture when adapting."""
        info = self.decode_info(self.config.realism)
        version = self._decoded_with.pop((device, sequence), None)
        if self.adapters is not None:
            info["adapter"] = version or self.adapters.version_for(device)
        return info

    def decode_settings(self, realism: float | None = None, seed: int | None = None, steps: int | None = None):
        from mridc.cloud.pipeline import DecodeSettings  # torch-side; the service always runs beside it

        return DecodeSettings(realism=self.config.realism if realism is None else realism,
                              seed=self.config.seed if seed is None else seed, steps=steps or self.config.steps)

    def _decode(self, frames: list[ValidFrame]) -> list[np.ndarray]:
        """Decode a batch; frames of devices with an adapted decoder go through theirs (one call per decoder)."""
        if self.adapters is None:
            return self._decode_with(self.decoder, frames)
        groups: dict[int, tuple[Any, str, list[int]]] = {}
        for i, f in enumerate(frames):
            device = f.envelope.device_id
            decoder = self.adapters.decoder_for(device)  # read once: a swap mid-batch changes no frame's decoder
            groups.setdefault(id(decoder), (decoder, self.adapters.version_for(device), []))[2].append(i)
        images: list[Any] = [None] * len(frames)
        for decoder, version, members in groups.values():
            for i, image in zip(members, self._decode_with(decoder, [frames[i] for i in members]), strict=True):
                images[i] = image
                env = frames[i].envelope
                self._decoded_with[(env.device_id, env.sequence)] = version
        return images

    def _decode_with(self, decoder: FrameDecoder, frames: list[ValidFrame]) -> list[np.ndarray]:
        # The TokenFrames that validation parsed are decoded as they are: each stream is parsed once.
        token_frames = [f.token_frame for f in frames]
        if self.progressive and hasattr(decoder, "refine_outputs"):
            outputs = decoder.decode_frames(token_frames, self.decode_settings(), keep_intermediate=True)
            with self._inflight_lock:
                for f, out in zip(frames, outputs, strict=True):
                    self._previews[(f.envelope.device_id, f.envelope.sequence)] = out
                while len(self._previews) > self._previews_max:
                    self._previews.popitem(last=False)
        else:
            outputs = decoder.decode_frames(token_frames, self.decode_settings())
        return [out.image for out in outputs]

    def _decode_batch(self, batch: list[DecodeJob]) -> None:
        start = time.monotonic()
        images: list[np.ndarray | Exception]
        try:
            with self.decoder_lock:
                images = self._decode([job.frame for job in batch])
        except Exception:
            # One poisoned frame must not sink the batch: retry one by one to find it.
            log.exception("batch decode failed; retrying frame by frame")
            images = []
            for job in batch:
                try:
                    with self.decoder_lock:
                        images.append(self._decode([job.frame])[0])
                except Exception as exc:
                    log.warning("frame decode failed", exc_info=True)
                    images.append(exc)
        decode_s = time.monotonic() - start
        self.metrics.decode_seconds.observe(decode_s)
        self.metrics.batch_size.observe(len(batch))
        for job, image in zip(batch, images, strict=True):
            env = job.frame.envelope
            if isinstance(image, Exception):
                self.store.release(env.device_id, env.sequence, self.instance)
                exc = FrameRejected("decode_failed", f"{type(image).__name__}: {image}"[:200])
                self.metrics.frames_rejected.labels(exc.code).inc()
                self._finish(job, make_ack(env.device_id, env.sequence, Ack.REJECTED, str(exc)))
                continue
            try:
                record = self._store(job, image, start, decode_s, len(batch))
            except ClaimLost as exc:
                # Another instance took the claim over (this one looked dead) and stored it first; or, for an
                # update, a version with as many slices was stored meanwhile.
                self.metrics.decodes_discarded.inc()
                log.warning("decode discarded", extra={"fields": {"device": env.device_id, "sequence": env.sequence,
                                                                  "reason": str(exc)}})
                self._finish(job, make_ack(env.device_id, env.sequence, Ack.DUPLICATE, "stored by another worker"))
                continue
            except Exception:
                # Not stored, not acked: the broker redelivers it (MQTT) / the device resends (gRPC).
                log.exception("store failed", extra={"fields": {"device": env.device_id, "sequence": env.sequence}})
                self.store.release(env.device_id, env.sequence, self.instance)
                self._finish(job, make_ack(env.device_id, env.sequence, Ack.RETRY_LATER, "store failed"))
                continue
            self.decoded_count += 1
            self.metrics.frames_stored.labels(job.transport).inc()
            if job.update:
                self.metrics.frames_updated.inc()
            self.metrics.end_to_end_seconds.observe(max(0.0, record.stored_at - env.capture_time_us / 1e6))
            log.info("frame stored", extra={"fields": {"device": env.device_id, "sequence": env.sequence,
                                                       "bytes": record.bytes, "bpp": round(record.bpp, 5),
                                                       "decode_s": round(decode_s, 4), "batch": len(batch),
                                                       "transport": job.transport, "stage": record.stage,
                                                       "update": job.update, "worker_id": self.config.worker_id}})
            wants = self.adapters is not None and self.adapters.wants_stills(env.device_id)
            self._finish(job, make_ack(env.device_id, env.sequence, Ack.STORED, calibrate=wants))
            self._announce(record)
            if record.stage == PREVIEW:
                self._refine_hint.set()
        for job in batch:  # versions of frames that were not stored (failed, discarded) are not needed
            self._decoded_with.pop(job.key, None)

    def _store(self, job: DecodeJob, image: np.ndarray, start: float, decode_s: float, batch: int) -> StoredFrame:
        env = job.frame.envelope
        decode_record = self._decode_record(env.device_id, env.sequence)
        # The diffusion refiner is not adapted to a scene: an adapted decode is the final picture unless
        # adapt_refine (on the measured scene the base refiner undid the gain; docs/adaptation.md).
        refine = decode_record.get("adapter", "base") == "base" or self.config.adapt_refine
        height, width = image.shape[:2]
        store_start = time.monotonic()
        record = StoredFrame(
            device_id=env.device_id, sequence=env.sequence, capture_time_us=env.capture_time_us,
            width=int(width), height=int(height), bytes=len(env.bitstream),
            bpp=len(env.bitstream) * 8 / float(width * height), model_id=env.model_id,
            transport=job.transport, worker_id=self.config.worker_id,
            decode=decode_record, stage=PREVIEW if self.progressive and refine else FINAL,
            content_sha256=hashlib.sha256(env.bitstream).hexdigest(),
            timings={"queue_s": round(start - job.received_mono, 6), "decode_batch_s": round(decode_s, 6),
                     "batch_size": batch},
            slices={"held": sorted(job.slices[0]), "count": job.slices[1]} if job.slices else {},
        )
        self.metrics.queue_seconds.observe(start - job.received_mono)
        png = encode_png(image)
        record.timings["png_encode_s"] = round(time.monotonic() - store_start, 6)
        # The stream is kept for a refinement, and for a sliced frame so that late slices can join it later.
        keep = self.progressive or job.slices is not None
        record = self.store.put(record, png=png, instance=None if job.update else self.instance,
                                bitstream=env.bitstream if keep else None, update=job.update)
        return record
