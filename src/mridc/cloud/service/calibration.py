"""Checks on an incoming calibration still (scene adaptation), before it is kept.

Like frame validation: the size limit before protobuf parsing, the hash before the image is opened, the
image's header (format, size, pixel count) before its pixels are decoded. Each failure is a
`CalibrationRejected` with a metric `code`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from mridc.shared.protocol import CALIBRATION_FORMATS, DEVICE_ID_RULE, is_valid_device_id
from mridc.v1 import mridc_pb2

MAX_CALIBRATION_PIXELS = 16_000_000
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "avif": "AVIF"}


class CalibrationRejected(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ValidCalibration:
    message: mridc_pb2.CalibrationFrame
    image: np.ndarray  # HxWx3 uint8 RGB


def validate_calibration(payload: bytes, *, max_bytes: int, known_model_ids: Collection[int] | None,
                         topic_device: str | None, allowed_devices: Collection[str] | None) -> ValidCalibration:
    """A calibration still that may be kept, or CalibrationRejected. `allowed_devices` None: any device."""
    if len(payload) > max_bytes:
        raise CalibrationRejected("too_large", f"{len(payload)} bytes > limit {max_bytes}")
    message = mridc_pb2.CalibrationFrame()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise CalibrationRejected("malformed", f"not a CalibrationFrame: {exc}") from None
    if not is_valid_device_id(message.device_id):
        raise CalibrationRejected("bad_device_id", f"device_id must be {DEVICE_ID_RULE}")
    if topic_device is not None and message.device_id != topic_device:
        raise CalibrationRejected("topic_mismatch", f"device {message.device_id!r} on {topic_device!r}'s topic")
    if allowed_devices is not None and message.device_id not in allowed_devices:
        raise CalibrationRejected("not_allowed", f"device {message.device_id!r} may not send calibration stills")
    if not 0 < message.sequence < 2**63:
        raise CalibrationRejected("bad_sequence", f"sequence {message.sequence} not in [1, 2**63)")
    if known_model_ids is not None and message.model_id not in known_model_ids:
        raise CalibrationRejected("wrong_model", f"model id {message.model_id:08x} is not this decoder's")
    if message.format not in CALIBRATION_FORMATS:
        raise CalibrationRejected("bad_format", f"format {message.format[:20]!r} not one of {CALIBRATION_FORMATS}")
    if hashlib.sha256(message.image).digest() != message.content_hash:
        raise CalibrationRejected("hash_mismatch", "content_hash is not the SHA-256 of image")
    if not 0 < message.width * message.height <= MAX_CALIBRATION_PIXELS:
        raise CalibrationRejected("bad_size", f"{message.width}x{message.height} is not a frame size this service "
                                              f"accepts (at most {MAX_CALIBRATION_PIXELS / 1e6:.0f} MP)")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(message.image), formats=[PIL_FORMATS[message.format]]) as im:
            if im.size != (message.width, message.height):  # the header, before any pixel is decoded
                raise CalibrationRejected("bad_size", f"the image is {im.size[0]}x{im.size[1]}, the message says "
                                                      f"{message.width}x{message.height}")
            rgb = np.asarray(im.convert("RGB"))
    except CalibrationRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on a broken or forged file
        raise CalibrationRejected("bad_image", f"{message.format} does not decode: {type(exc).__name__}") from None
    return ValidCalibration(message, rgb)
