"""Test doubles for the cloud service: the lab's synthetic streams, wrapped in envelopes, and what they decode to.

The streams and the token-painting decoder are mridc.lab.synthetic (the service benchmark uses them too);
this module only adds what the tests need around them.
"""

from __future__ import annotations

import numpy as np

from mridc.lab.synthetic import SYNTHETIC_CODEBOOK_BITS as CODEBOOK_BITS
from mridc.lab.synthetic import SYNTHETIC_MODEL_ID as TEST_MODEL_ID
from mridc.lab.synthetic import TokenPaintDecoder, make_token_paint_decoder, synthetic_stream
from mridc.shared.protocol import build_envelope
from mridc.v1 import mridc_pb2

__all__ = ["CODEBOOK_BITS", "TEST_MODEL_ID", "TokenPaintDecoder", "expected_image", "make_envelope", "make_stream",
           "make_token_paint_decoder"]


def make_stream(device_id: str, sequence: int, *, keep: float = 0.6) -> bytes:
    """A real MRD stream whose tokens depend on (device, sequence)."""
    return synthetic_stream(f"{device_id}/{sequence}", keep=keep)


def make_envelope(device_id: str, sequence: int, bitstream: bytes | None = None,
                  **fields) -> mridc_pb2.FrameEnvelope:
    bitstream = make_stream(device_id, sequence) if bitstream is None else bitstream
    fields.setdefault("model_id", TEST_MODEL_ID)
    return build_envelope(device_id, sequence, bitstream, **fields)


def expected_image(device_id: str, sequence: int) -> np.ndarray:
    decoder = TokenPaintDecoder()
    return decoder.paint(decoder.validate(make_stream(device_id, sequence)))
