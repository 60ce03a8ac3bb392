"""Video-codec baseline (mridc.lab.video): x264/x265/SVT-AV1 through ffmpeg on tiny synthetic sequences."""

from __future__ import annotations

import numpy as np
import pytest

from mridc.lab.video import (
    VIDEO_CODECS,
    VideoCodecError,
    best_sequence,
    encode_sequence,
    video_availability,
)

pytestmark = pytest.mark.skipif(video_availability("x264") is not None,
                                reason=str(video_availability("x264")))


def moving_frames(width: int = 128, height: int = 96, n: int = 5, seed: int = 0) -> list[np.ndarray]:
    """A fixed textured background and a red block moving right: what a fixed camera sees."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([128 + 60 * np.sin(xx / 9.0), 128 + 50 * np.cos(yy / 7.0), 100 + 40 * np.sin((xx + yy) / 13.0)], -1)
    bg = bg + rng.normal(0, 4, bg.shape)
    out = []
    for i in range(n):
        frame = bg.copy()
        x0, y0 = 10 + 12 * i, height // 3
        frame[y0:y0 + height // 4, x0:x0 + width // 6] = (220, 40, 40)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def frames():
    return moving_frames()


def _needs(codec: str) -> None:
    reason = video_availability(codec)
    if reason:
        pytest.skip(reason)


def _check_stream(res, frames) -> None:
    n = len(frames)
    assert len(res.decoded) == n and len(res.bytes_per_frame) == n
    assert all(d.shape == frames[0].shape and d.dtype == np.uint8 for d in res.decoded)
    assert sum(res.bytes_per_frame) == len(res.stream)
    assert res.total_bytes == sum(res.bytes_per_frame) + res.side_bytes
    assert res.bytes_per_frame[0] == max(res.bytes_per_frame)  # the I-frame
    assert res.frame_types == ["I"] + ["P"] * (n - 1)  # one GOP, no B-frames, no scene-cut I-frames


def test_availability():
    assert video_availability("x264") is None
    assert "unknown video codec" in video_availability("mpeg1")
    assert set(VIDEO_CODECS) == {"x264", "x265", "svtav1"}


@pytest.mark.parametrize("codec", ["x264", "x265"])
def test_round_trip(codec, frames):
    _needs(codec)
    res = encode_sequence(frames, codec, mean_bytes_per_frame=1500, interval_s=1.0)
    _check_stream(res, frames)
    assert res.side_bytes == 0 and res.coded_size == (128, 96)
    assert "-framerate 1/1" in res.settings and "-bf 0" in res.settings and "scenecut=0" in res.settings
    assert res.mean_psnr(frames) > 25


@pytest.mark.parametrize("codec", ["x264", "x265"])
def test_odd_size_padded_and_cropped(codec):
    _needs(codec)
    frames = moving_frames(129, 97, 4)
    res = encode_sequence(frames, codec, mean_bytes_per_frame=1500, interval_s=1.0)
    _check_stream(res, frames)
    assert res.coded_size == (130, 98) and res.side_bytes == 4


@pytest.mark.parametrize("codec", ["x264", "x265"])
def test_mean_bytes_near_target(codec, frames):
    # Measured at 128x96, 5 frames, 1500 bytes/frame: within 10 % after at most two corrections (x264 and x265).
    # One-pass ABR does not know the clip is 5 frames long, so the I-frame's share makes it jumpy; 35 % is the
    # bound we hold it to here, the corrective loop's own goal is 25 %.
    _needs(codec)
    res = encode_sequence(frames, codec, mean_bytes_per_frame=1500, interval_s=1.0)
    assert abs(res.mean_bytes_per_frame / 1500 - 1) < 0.35, res.attempts
    assert len(res.attempts) <= 3 and sum(a["kept"] for a in res.attempts) == 1


def test_long_interval_uses_rational_rate(frames):
    # 0.2 fps, 1000 bytes/frame = 1.6 kbit/s: 2k would be 25 % off, so a 3x clock: 0.6 fps at 5 kbit/s (4 % off)
    res = encode_sequence(frames, "x264", mean_bytes_per_frame=1000, interval_s=5.0)
    _check_stream(res, frames)
    assert res.attempts[0]["rate_clock"] == 3
    assert "-framerate 3/5" in res.attempts[0]["command"] and "-b:v 5k" in res.attempts[0]["command"]


@pytest.mark.parametrize("codec", ["x264", "x265"])
def test_higher_budget_higher_psnr(codec, frames):
    _needs(codec)
    low = encode_sequence(frames, codec, mean_bytes_per_frame=500)
    high = encode_sequence(frames, codec, mean_bytes_per_frame=4000)
    assert high.total_bytes > low.total_bytes
    assert high.mean_psnr(frames) > low.mean_psnr(frames) + 0.3  # measured: +0.9 dB (x264), noisy background


def test_scale_and_best_sequence(frames):
    res = encode_sequence(frames, "x264", mean_bytes_per_frame=800, scale=0.5)
    _check_stream(res, frames)
    assert res.coded_size == (64, 48) and res.side_bytes == 4
    best = best_sequence(frames, "x264", 800, 1.0, scales=(1.0, 0.5))
    assert [t["scale"] for t in best.tried] == [1.0, 0.5]
    assert best.scale in (1.0, 0.5) and best.decoded[0].shape == frames[0].shape


def test_svtav1(frames):
    _needs("svtav1")
    res = encode_sequence(frames, "svtav1", mean_bytes_per_frame=1500)
    _check_stream(res, frames)
    assert "pred-struct=1" in res.settings and res.warnings


def test_bad_input(frames):
    with pytest.raises(VideoCodecError, match="non-empty"):
        encode_sequence([], "x264", mean_bytes_per_frame=500)
    with pytest.raises(VideoCodecError, match="one size"):
        encode_sequence([frames[0], frames[1][:, :64]], "x264", mean_bytes_per_frame=500)
    with pytest.raises(ValueError, match="uint8"):
        encode_sequence([frames[0].astype(np.float32)], "x264", mean_bytes_per_frame=500)
    with pytest.raises(VideoCodecError, match="unknown video codec"):
        encode_sequence(frames, "mpeg1", mean_bytes_per_frame=500)
    with pytest.raises(VideoCodecError, match="positive"):
        encode_sequence(frames, "x264", mean_bytes_per_frame=0)


def test_ffmpeg_failure_reports_stderr(frames):
    with pytest.raises(VideoCodecError, match="x264 encode failed") as info:
        encode_sequence(frames, "x264", mean_bytes_per_frame=500, preset="no-such-preset")
    assert "ffmpeg" in str(info.value) and "preset" in str(info.value).lower()
