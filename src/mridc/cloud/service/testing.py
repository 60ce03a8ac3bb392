"""A clearly named *test* decoder for the service, and synthetic MRD streams for it.

`TokenPaintDecoder` parses the real MRD stream with mridc.shared.bitstream (CRC, header, model id,
entropy-coded sections) and paints each kept token as a flat block whose colour is a fixed function of the
token index (masked tokens grey). It is deterministic, so tests can check that a stored PNG came from exactly
that stream, and it lets the load benchmark measure the transport/ingest ceiling without decoder cost.
It is not an image decoder: production uses mridc.cloud.pipeline.MRIDCDecoder (`--decoder mridc`).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from mridc.shared.bitstream import TokenFrame, compress, decompress
from mridc.shared.entropy import TokenPrior
from mridc.v1 import mridc_pb2

TEST_MODEL_ID = 0x7E57C0DE
CODEBOOK_BITS = 10
GRID_H, GRID_W, STRIDE = 6, 8, 8  # 64x48 images: fast to paint and to PNG-encode
_PRIOR = TokenPrior.uniform(1 << CODEBOOK_BITS)


def token_colour(token: int) -> tuple[int, int, int]:
    return (token * 37) % 256, (token * 91 + 13) % 256, (token * 151 + 101) % 256


class TokenPaintDecoder:
    """A test decoder over real MRD parsing (see module doc). `delay_s` simulates decode cost per frame."""

    model_ids = frozenset({TEST_MODEL_ID})

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def validate(self, bitstream: bytes) -> TokenFrame:
        return decompress(bitstream, _PRIOR, model_id=TEST_MODEL_ID)

    def paint(self, frame: TokenFrame) -> np.ndarray:
        grid = np.full((frame.grid_h, frame.grid_w, 3), 128, dtype=np.uint8)
        rows, cols = np.nonzero(frame.keep_mask)
        for r, c, token in zip(rows, cols, frame.kept_tokens, strict=True):
            grid[r, c] = token_colour(int(token))
        image = grid.repeat(frame.height // frame.grid_h, 0).repeat(frame.width // frame.grid_w, 1)
        return image[: frame.height, : frame.width]

    def decode_batch(self, bitstreams, realism: float = 0.0, seed: int = 0, steps=None) -> list[np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s * len(bitstreams))
        return [self.paint(self.validate(b)) for b in bitstreams]

    def decode(self, bitstream, realism: float = 0.0, seed: int = 0, steps=None) -> np.ndarray:
        return self.decode_batch([bitstream], realism, seed)[0]


def make_token_paint_decoder(models_dir=None, device: str = "cpu") -> TokenPaintDecoder:
    """Factory for `--decoder mridc.cloud.service.testing:make_token_paint_decoder`.

    MRIDC_TEST_DECODE_DELAY_S adds a simulated decode cost per frame."""
    return TokenPaintDecoder(delay_s=float(os.environ.get("MRIDC_TEST_DECODE_DELAY_S", "0")))


def make_stream(device_id: str, sequence: int, *, keep: float = 0.6) -> bytes:
    """A real MRD stream whose tokens depend on (device, sequence)."""
    seed = int.from_bytes(hashlib.sha256(f"{device_id}/{sequence}".encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    mask = rng.random((GRID_H, GRID_W)) < keep
    mask[0, 0] = True
    tokens = rng.integers(0, 1 << CODEBOOK_BITS, size=int(mask.sum()), dtype=np.uint16)
    frame = TokenFrame(width=GRID_W * STRIDE, height=GRID_H * STRIDE, grid_h=GRID_H, grid_w=GRID_W,
                       model_id=TEST_MODEL_ID, codebook_bits=CODEBOOK_BITS, keep_mask=mask, kept_tokens=tokens)
    return compress(frame, _PRIOR)


def make_envelope(device_id: str, sequence: int, bitstream: bytes | None = None,
                  **fields) -> mridc_pb2.FrameEnvelope:
    bitstream = make_stream(device_id, sequence) if bitstream is None else bitstream
    values = {"device_id": device_id, "sequence": sequence, "capture_time_us": time.time_ns() // 1000,
              "bitstream": bitstream, "content_hash": hashlib.sha256(bitstream).digest(),
              "model_id": TEST_MODEL_ID}
    values.update(fields)
    return mridc_pb2.FrameEnvelope(**values)


def expected_image(device_id: str, sequence: int) -> np.ndarray:
    decoder = TokenPaintDecoder()
    return decoder.paint(decoder.validate(make_stream(device_id, sequence)))
