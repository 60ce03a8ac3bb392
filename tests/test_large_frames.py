"""Large frames: the windowed predictor (identical on one window, exact for a local model) and the pixel limit."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mridc.cloud.predictor import BidirectionalTokenPredictor, WindowedPredictor, tiny_predictor_config


class LocalPredictor(nn.Module):
    """Logits that depend only on each position's own token and keep bit: any window gives the same answer."""

    def __init__(self, codebook_size: int = 16):
        super().__init__()
        self.cfg = tiny_predictor_config(codebook_size)
        self.table = nn.Parameter(torch.randn(2, codebook_size, codebook_size))

    def forward(self, tokens, keep_mask):
        return self.table[keep_mask.long(), tokens]


def test_a_grid_within_one_window_is_passed_through_bit_exactly():
    torch.manual_seed(0)
    predictor = BidirectionalTokenPredictor(tiny_predictor_config(64)).eval()
    tokens = torch.randint(0, 64, (2, 12, 20))
    keep = torch.rand(2, 12, 20) < 0.5
    with torch.no_grad():
        assert torch.equal(WindowedPredictor(predictor, window=20, overlap=4)(tokens, keep), predictor(tokens, keep))


@pytest.mark.parametrize("shape", [(50, 70), (17, 33), (33, 16), (96, 96)])
def test_windows_cover_every_position_exactly_for_a_local_model(shape):
    torch.manual_seed(1)
    local = LocalPredictor()
    tokens = torch.randint(0, 16, (1, *shape))
    keep = torch.rand(1, *shape) < 0.5
    windowed = WindowedPredictor(local, window=16, overlap=3)
    with torch.no_grad():
        assert torch.equal(windowed(tokens, keep), local(tokens, keep))


def test_window_starts_tile_the_grid_and_end_flush():
    for size in range(1, 200):
        starts = WindowedPredictor.starts(size, 48, 8)
        assert starts[0] == 0 and (size <= 48 or starts[-1] == size - 48)
        assert all(b - a <= 48 - 16 for a, b in itertools.pairwise(starts))


def test_overlap_must_leave_a_centre():
    with pytest.raises(ValueError, match="overlap"):
        WindowedPredictor(LocalPredictor(), window=16, overlap=8)


def test_attention_on_a_large_grid_stays_windowed():
    # 160 x 240 tokens (a 10 MP photo at stride 16): full attention would need a 38,400^2 matrix per head.
    torch.manual_seed(2)
    predictor = BidirectionalTokenPredictor(tiny_predictor_config(32)).eval()
    tokens = torch.randint(0, 32, (1, 160, 240))
    keep = torch.rand(1, 160, 240) < 0.5
    with torch.no_grad():
        logits = WindowedPredictor(predictor, window=48, overlap=8)(tokens, keep)
    assert logits.shape == (1, 160, 240, 32) and torch.isfinite(logits).all()


def test_decoder_refuses_a_frame_over_its_pixel_limit_before_any_work():
    from mridc.cloud.pipeline import FrameTooLarge, MRIDCDecoder
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
    from mridc.shared.bitstream import TokenFrame, compress

    tokenizer = VQTokenizer(tiny_tokenizer_config())
    decoder = MRIDCDecoder(tokenizer, max_frame_pixels=64 * 64)
    grid = (8, 8)
    frame = TokenFrame(width=128, height=128, grid_h=grid[0], grid_w=grid[1], model_id=decoder.model_id,
                       codebook_bits=6, keep_mask=torch.ones(grid, dtype=torch.bool).numpy(),
                       kept_tokens=torch.zeros(64, dtype=torch.int32).numpy().astype("uint16"))
    stream = compress(frame, decoder.prior)
    with pytest.raises(FrameTooLarge, match="128x128"):
        decoder.validate(stream)
    with pytest.raises(FrameTooLarge):
        decoder.decode_frames([frame])
    assert isinstance(FrameTooLarge("x"), ValueError)  # the service and the CLI report it as bad input
    small = MRIDCDecoder(tokenizer, max_frame_pixels=128 * 128)
    assert small.decode(stream, realism=0.0).shape == (128, 128, 3)
