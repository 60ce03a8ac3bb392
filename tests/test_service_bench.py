"""The service load benchmark runs end to end on a tiny fleet (the full run is `bench/service_load.py`)."""

from __future__ import annotations

import json

import pytest

from mridc.bench.service_load import run_service_bench

pytestmark = pytest.mark.net


def test_service_bench_small_fleet_writes_json_and_plot(tmp_path):
    result = run_service_bench(tmp_path, devices=8, interval_s=0.5, duration_s=3, workers=(1,),
                               modes=("transport",), drain_timeout_s=20)
    run = result["runs"][0]
    assert run["frames_sent"] > 0 and run["frames_acked"] == run["frames_sent"] == run["unique_stored"]
    assert run["throughput_fps"] > 0 and run["timeline"] and run["rss_mib_max"] > 0
    saved = json.loads((tmp_path / "service_load.json").read_text())
    assert saved["summary_fps"]["transport"]["1"] == run["throughput_fps"]
    assert (tmp_path / "service_load.png").stat().st_size > 10_000
