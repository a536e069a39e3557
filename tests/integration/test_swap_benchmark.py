"""benchmarks/swap.py runs, and its ratio is its figures' quotient."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import is_printed_quotient

ROOT = Path(__file__).resolve().parents[2]


def test_prints_the_swap_round_trip_against_recomputing(tiny_llama_dir: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.swap", "--quick", "--context", "200"]
    command += ["--model", str(tiny_llama_dir), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    figures = re.search(
        r"a 203-token session \((\S+) MiB of KV, float32\) on cpu: swap-out (\S+) ms, "
        r"swap-in (\S+) ms; recomputing it \(prefill\) (\S+) ms\n"
        r"offload round trip ÷ recompute: (\S+)",
        result.stdout,
    )
    assert figures, result.stdout
    kv_mib, out_ms, in_ms, prefill_ms, ratio = (float(value) for value in figures.groups())
    assert kv_mib > 0 and out_ms > 0 and in_ms > 0 and prefill_ms > 0
    assert is_printed_quotient(ratio, out_ms + in_ms, prefill_ms, 1, 3)
