"""Fuzzing the MRD parser: every input must decode or raise BitstreamError, quickly.

CI runs a few thousand cases here; `make fuzz` (python -m mridc.shared.fuzz --cases N) runs more.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mridc.shared.bitstream import BitstreamError, decompress
from mridc.shared.fuzz import _fix_crc, check_stream, main, run_fuzz, seed_streams, zipf_prior

SEEDS = seed_streams(np.random.default_rng(7))


def test_random_and_mutated_streams():
    report = run_fuzz(cases=30000, seed=1, max_case_s=2.0)
    print(f"fuzz: {report.cases} cases, {report.decoded} decoded, {report.rejected} rejected, "
          f"slowest {report.slowest_s * 1e3:.1f} ms")
    assert report.failures == []
    assert report.decoded > 0 and report.rejected > 0  # both paths exercised


def test_every_bit_flip_of_a_stream_is_caught_by_the_crc():
    data, prior = next((d, p) for d, p in SEEDS if 40 < len(d) < 120)
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        try:
            decompress(bytes(flipped), prior)
        except BitstreamError:
            continue
        raise AssertionError(f"bit flip {i} was accepted")


def test_every_bit_flip_behind_a_fixed_crc_decodes_or_raises():
    """With the CRC recomputed, flips reach the header parser and the entropy decoders."""
    for data, prior in SEEDS[::7]:
        for i in range(len(data) * 8):
            flipped = bytearray(data)
            flipped[i // 8] ^= 1 << (i % 8)
            check_stream(_fix_crc(bytes(flipped)), prior)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes(data, fix):
    check_stream(_fix_crc(b"MR\x01" + data) if fix else data, zipf_prior())


def test_cli_entry_point(capsys):
    assert main(["--cases", "200", "--seed", "3"]) == 0
    assert "0 failures" in capsys.readouterr().out
