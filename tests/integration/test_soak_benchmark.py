"""benchmarks/soak.py runs its rounds against a real server, and reports what the server
still holds once its clients are gone: nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import is_printed_quotient

ROOT = Path(__file__).resolve().parents[2]


def test_reports_memory_by_round_and_nothing_held_after_the_ttl(tiny_llama_dir: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.soak", "--rounds", "4", "--dtype", "float32"]
    command += ["--model", str(tiny_llama_dir), "--kv-cache-memory", "256KiB"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rounds = re.findall(r"round (\d)/4: \S+ s, RSS (\d+) MiB", result.stdout)
    assert [number for number, _ in rounds] == ["1", "2", "3", "4"], result.stdout
    sizes = [int(size) for _, size in rounds]
    summary = re.search(
        r"RSS after 2 warm-up rounds (\d+) MiB, after round 4 (\d+) MiB, peak (\d+) MiB",
        result.stdout,
    )
    assert summary, result.stdout
    assert [int(value) for value in summary.groups()] == [sizes[1], sizes[3], max(sizes)]
    held = re.search(
        r"after the TTL: 0 sessions, 0 KV blocks and 0 bytes of host memory held; "
        r"(\d+) evictions in the run",
        result.stdout,
    )
    assert held and int(held.group(1)) > 0, result.stdout  # the pool was under pressure
    ratio = float(re.search(r"RSS last ÷ after warm-up: (\S+)", result.stdout).group(1))
    assert is_printed_quotient(ratio, sizes[3], sizes[1], 0, 3)
