"""benchmarks/swaps.py: both round trips give the pool back as it was (the baseline is
a faithful copy, not a shortcut), and the run prints both times and their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import swaps

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("round_trip", [swaps.engine_round_trip, swaps.layer_by_layer_round_trip])
def test_a_round_trip_restores_every_block(round_trip: swaps.RoundTrip) -> None:
    runner = swaps._runner(3, torch.device("cpu"), torch.bfloat16)
    for keys, values in runner.kv_caches:
        keys.normal_()
        values.normal_()
    before = [(keys.clone(), values.clone()) for keys, values in runner.kv_caches]
    round_trip(runner, [2, 0, 1])
    for (keys, values), (old_keys, old_values) in zip(runner.kv_caches, before, strict=True):
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)
    assert runner.host_kv == {}


def test_prints_both_round_trips_and_their_ratio() -> None:
    command = [sys.executable, "-m", "benchmarks.swaps", "--quick", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found = re.search(r"engine (\S+) ms, layer by layer (\S+) ms\n.*: (\S+)", result.stdout)
    assert found is not None, result.stdout
    ours, theirs, ratio = (float(value) for value in found.groups())
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.02
