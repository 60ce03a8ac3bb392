"""Cheap checks on an incoming frame, run before anything is queued for decoding.

Order matters: the size limit comes before protobuf parsing, the hash before the bitstream parse, and the
bitstream parse (CRC, header, model id) before the decode queue. Each failure is a `FrameRejected` with a
short machine-readable `code` (a metric label) and a human-readable `detail` (sent to the device).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from mridc.shared.protocol import DEVICE_ID_RULE, is_valid_device_id
from mridc.v1 import mridc_pb2

REJECT_CODES = (
    "payload_too_large", "malformed_envelope", "bad_device_id", "topic_mismatch", "unauthorized_device",
    "bad_sequence", "bad_capture_time", "empty_bitstream", "bitstream_too_large", "meta_too_large", "hash_mismatch",
    "unknown_model", "bad_bitstream", "model_id_mismatch", "decode_failed",
)


class FrameRejected(Exception):
    """A frame that will never be accepted: the device should drop it from its queue."""

    def __init__(self, code: str, detail: str):
        assert code in REJECT_CODES, code
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    max_bitstream_bytes: int = 48 * 1024
    max_meta_bytes: int = 2048


@dataclass(frozen=True)
class ValidFrame:
    envelope: mridc_pb2.FrameEnvelope
    token_frame: Any  # mridc.shared.bitstream.TokenFrame (what the decoder's validate returned)
    payload_bytes: int


def parse_envelope(payload: bytes, limits: Limits) -> mridc_pb2.FrameEnvelope:
    if len(payload) > limits.max_payload_bytes:
        raise FrameRejected("payload_too_large", f"{len(payload)} bytes > limit {limits.max_payload_bytes}")
    envelope = mridc_pb2.FrameEnvelope()
    try:
        envelope.ParseFromString(payload)
    except DecodeError as exc:
        raise FrameRejected("malformed_envelope", f"not a FrameEnvelope: {exc}") from None
    return envelope


def check_envelope(envelope: mridc_pb2.FrameEnvelope, limits: Limits, *, topic_device: str | None = None,
                   authenticated_device: str | None = None) -> None:
    """Field checks that need no bitstream parsing."""
    device = envelope.device_id
    if not is_valid_device_id(device):
        raise FrameRejected("bad_device_id", f"device_id {device[:80]!r} is not {DEVICE_ID_RULE}")
    if topic_device is not None and topic_device != device:
        raise FrameRejected("topic_mismatch", f"envelope device {device!r} published on {topic_device!r}'s topic")
    if authenticated_device is not None and authenticated_device != device:
        raise FrameRejected("unauthorized_device", f"credentials are for {authenticated_device!r}, not {device!r}")
    if envelope.sequence >= 2**63:  # the SQLite index stores it as a signed 64-bit integer
        raise FrameRejected("bad_sequence", f"sequence {envelope.sequence} >= 2**63")
    if envelope.capture_time_us <= 0:
        raise FrameRejected("bad_capture_time", f"capture_time_us must be > 0, got {envelope.capture_time_us}")
    size = len(envelope.bitstream)
    if size == 0:
        raise FrameRejected("empty_bitstream", "bitstream is empty")
    if size > limits.max_bitstream_bytes:
        raise FrameRejected("bitstream_too_large", f"{size} bytes > limit {limits.max_bitstream_bytes}")
    meta_size = sum(len(k) + len(v) for k, v in envelope.meta.items())
    if meta_size > limits.max_meta_bytes:
        raise FrameRejected("meta_too_large", f"meta is {meta_size} bytes > limit {limits.max_meta_bytes}")
    if hashlib.sha256(envelope.bitstream).digest() != envelope.content_hash:
        raise FrameRejected("hash_mismatch", "content_hash is not the SHA-256 of bitstream")


def check_bitstream(envelope: mridc_pb2.FrameEnvelope, validate: Callable[[bytes], Any],
                    known_model_ids: Collection[int] | None = None) -> Any:
    """CRC, header and model id, through the decoder's own cheap `validate`. Returns its TokenFrame."""
    if known_model_ids is not None and envelope.model_id not in known_model_ids:
        raise FrameRejected("unknown_model", f"model id {envelope.model_id:#010x} is not served here")
    try:
        token_frame = validate(envelope.bitstream)
    except ValueError as exc:  # mridc.shared.bitstream.BitstreamError is a ValueError
        raise FrameRejected("bad_bitstream", str(exc)[:200]) from None
    header_model = getattr(token_frame, "model_id", envelope.model_id)
    if header_model != envelope.model_id:
        raise FrameRejected("model_id_mismatch",
                            f"envelope says {envelope.model_id:#010x}, stream says {header_model:#010x}")
    return token_frame


def validate_envelope(envelope: mridc_pb2.FrameEnvelope, limits: Limits, validate: Callable[[bytes], Any], *,
                      known_model_ids: Collection[int] | None = None, topic_device: str | None = None,
                      authenticated_device: str | None = None, payload_bytes: int | None = None) -> ValidFrame:
    check_envelope(envelope, limits, topic_device=topic_device, authenticated_device=authenticated_device)
    token_frame = check_bitstream(envelope, validate, known_model_ids)
    size = payload_bytes if payload_bytes is not None else envelope.ByteSize()
    return ValidFrame(envelope=envelope, token_frame=token_frame, payload_bytes=size)
