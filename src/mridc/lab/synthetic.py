"""Real MRD streams without a trained model, and a decoder that costs nothing: instruments for the benchmarks.

- ``SyntheticEncoder``: the ``EdgeEncoder.encode`` call, random tokens seeded by the image, at the requested
  bpp. Fleets and load tests drive the cloud with it without loading any model.
- ``synthetic_stream``: a small (64x48) stream whose tokens depend only on a key such as "device/sequence".
- ``TokenPaintDecoder``: parses the real MRD stream with mridc.shared.bitstream (CRC, header, model id,
  entropy-coded sections) and paints each kept token as a flat block whose colour is a fixed function of the
  token index (masked tokens grey). It is deterministic, so a stored PNG can be traced to exactly one stream,
  and it lets the service benchmark measure the transport/ingest ceiling without decoder cost. It is not an
  image decoder: production uses mridc.cloud.pipeline.MRIDCDecoder (`--decoder mridc`).

All of them use one model id, ``SYNTHETIC_MODEL_ID``, which no trained tokenizer has.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from mridc.shared.bitstream import TokenFrame, compress, decompress
from mridc.shared.entropy import TokenPrior

# "SYNT": no trained tokenizer has it, so these streams are never mistaken for real ones
SYNTHETIC_MODEL_ID = 0x53594E54
SYNTHETIC_STRIDE = 16
SYNTHETIC_CODEBOOK_BITS = 10
SYNTHETIC_PRIOR = TokenPrior.uniform(1 << SYNTHETIC_CODEBOOK_BITS)
# synthetic_stream: 64x48 images, fast to paint and to PNG-encode
STREAM_GRID_H, STREAM_GRID_W, STREAM_STRIDE = 6, 8, 8


def _seed(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def synthetic_stream(key: str, *, keep: float = 0.6) -> bytes:
    """A real MRD stream (6x8 tokens, 64x48 pixels) whose tokens depend only on ``key``."""
    rng = np.random.default_rng(_seed(key.encode()))
    mask = rng.random((STREAM_GRID_H, STREAM_GRID_W)) < keep
    mask[0, 0] = True
    tokens = rng.integers(0, 1 << SYNTHETIC_CODEBOOK_BITS, size=int(mask.sum()), dtype=np.uint16)
    frame = TokenFrame(width=STREAM_GRID_W * STREAM_STRIDE, height=STREAM_GRID_H * STREAM_STRIDE,
                       grid_h=STREAM_GRID_H, grid_w=STREAM_GRID_W, model_id=SYNTHETIC_MODEL_ID,
                       codebook_bits=SYNTHETIC_CODEBOOK_BITS, keep_mask=mask, kept_tokens=tokens)
    return compress(frame, SYNTHETIC_PRIOR)


@dataclass
class SyntheticResult:
    bitstream: bytes
    bpp: float
    token_frame: TokenFrame
    timings: dict = field(default_factory=dict)


class SyntheticEncoder:
    """Same ``encode`` call as ``EdgeEncoder``; random tokens seeded by the image, real MRD bytes.

    ``delay_s`` emulates a slow device CPU (the time a Pi spends in the real encoder).
    """

    def __init__(self, *, model_id: int = SYNTHETIC_MODEL_ID, delay_s: float = 0.0,
                 prior: TokenPrior | None = None) -> None:
        self.model_id = model_id
        self.delay_s = delay_s
        self.prior = prior or SYNTHETIC_PRIOR

    def encode(self, image: np.ndarray, bpp: float = 0.02, keep_ratio: float | None = None, rois=None,
               **_ignored) -> SyntheticResult:
        start = time.perf_counter()
        height, width = image.shape[:2]
        grid_h, grid_w = max(1, height // SYNTHETIC_STRIDE), max(1, width // SYNTHETIC_STRIDE)
        seed = _seed(np.ascontiguousarray(image[::8, ::8]).tobytes())
        rng = np.random.default_rng(seed)
        if keep_ratio is None:
            # ~11 bits per kept token (10 for the index, ~1 for the mask) after a small header.
            keep_ratio = (bpp * width * height - 200) / (11 * grid_h * grid_w)
        kept = int(np.clip(round(keep_ratio * grid_h * grid_w), 1, grid_h * grid_w))
        mask = np.zeros(grid_h * grid_w, dtype=bool)
        mask[rng.choice(grid_h * grid_w, size=kept, replace=False)] = True
        frame = TokenFrame(
            width=width, height=height, grid_h=grid_h, grid_w=grid_w, model_id=self.model_id,
            codebook_bits=SYNTHETIC_CODEBOOK_BITS, keep_mask=mask.reshape(grid_h, grid_w),
            kept_tokens=rng.integers(0, 1 << SYNTHETIC_CODEBOOK_BITS, kept).astype(np.uint16),
        )
        bitstream = compress(frame, self.prior)
        if self.delay_s:
            time.sleep(self.delay_s)
        return SyntheticResult(bitstream, len(bitstream) * 8 / (width * height), frame,
                               {"total_s": time.perf_counter() - start})


def token_colour(token: int) -> tuple[int, int, int]:
    return (token * 37) % 256, (token * 91 + 13) % 256, (token * 151 + 101) % 256


@dataclass(frozen=True)
class PaintedFrame:
    """What `decode_frames` returns per frame, as `mridc.cloud.pipeline.DecodeOutput` does."""

    image: np.ndarray
    frame: TokenFrame


class TokenPaintDecoder:
    """A test decoder over real MRD parsing (see module doc). `delay_s` simulates decode cost per frame."""

    model_ids = frozenset({SYNTHETIC_MODEL_ID})  # the default instance's (an instance may serve another model)

    def __init__(self, delay_s: float = 0.0, *, prior: TokenPrior | None = None, model_id: int = SYNTHETIC_MODEL_ID):
        """`prior` and `model_id` default to the synthetic streams'; a real edge bundle's make it paint the
        shipped encoder's streams (`make_bundle_paint_decoder`), inter frames included."""
        self.delay_s = delay_s
        self.prior = prior or SYNTHETIC_PRIOR
        self.model_id = model_id
        self.model_ids = frozenset({model_id})

    def validate(self, bitstream: bytes) -> TokenFrame:
        """A stream, or a sliced frame (`pack_slices`: missing rows masked), as MRIDCDecoder.validate takes them."""
        from mridc.shared.slices import decompress_slices, is_sliced_file, unpack_slices

        if is_sliced_file(bitstream):
            return decompress_slices(unpack_slices(bitstream), self.prior, model_id=self.model_id).frame
        return decompress(bitstream, self.prior, model_id=self.model_id)

    def paint(self, frame: TokenFrame) -> np.ndarray:
        grid = np.full((frame.grid_h, frame.grid_w, 3), 128, dtype=np.uint8)
        rows, cols = np.nonzero(frame.keep_mask)
        for r, c, token in zip(rows, cols, frame.kept_tokens, strict=True):
            grid[r, c] = token_colour(int(token))
        ys = np.minimum(np.arange(frame.height) * frame.grid_h // frame.height, frame.grid_h - 1)
        xs = np.minimum(np.arange(frame.width) * frame.grid_w // frame.width, frame.grid_w - 1)
        return grid[ys][:, xs]

    def decode_frames(self, frames, settings=None) -> list[PaintedFrame]:
        """Parsed frames -> one output each (the decoder interface the service calls); settings are ignored."""
        if self.delay_s:
            time.sleep(self.delay_s * len(frames))
        return [PaintedFrame(self.paint(f), f) for f in frames]

    def decode_batch(self, bitstreams, realism: float = 0.0, seed: int = 0, steps=None) -> list[np.ndarray]:
        return [out.image for out in self.decode_frames([self.validate(b) for b in bitstreams])]

    def decode(self, bitstream, realism: float = 0.0, seed: int = 0, steps=None) -> np.ndarray:
        return self.decode_batch([bitstream], realism, seed)[0]


def make_bundle_paint_decoder(models_dir=None, device: str = "cpu") -> TokenPaintDecoder:
    """The token painter over the shipped edge bundle's prior and model id: a service that parses the real
    encoder's streams (and inter frames) without loading the cloud models."""
    from pathlib import Path

    from mridc.shared.protocol import EdgeManifest
    from mridc.shared.zoo import default_models_dir

    edge = Path(models_dir or default_models_dir()) / "edge"
    manifest = EdgeManifest.read(edge / "manifest.json")
    return TokenPaintDecoder(float(os.environ.get("MRIDC_TEST_DECODE_DELAY_S", "0")),
                             prior=TokenPrior.load(edge / "token_prior.npz"), model_id=manifest.model_id)


def make_token_paint_decoder(models_dir=None, device: str = "cpu") -> TokenPaintDecoder:
    """Factory for `--decoder mridc.lab.synthetic:make_token_paint_decoder`.

    MRIDC_TEST_DECODE_DELAY_S adds a simulated decode cost per frame."""
    return TokenPaintDecoder(delay_s=float(os.environ.get("MRIDC_TEST_DECODE_DELAY_S", "0")))
