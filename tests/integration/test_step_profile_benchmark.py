"""benchmarks/step_profile.py runs and reports the step's busy share and its operators."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import is_printed_quotient

ROOT = Path(__file__).resolve().parents[2]


def test_prints_the_busy_share_of_a_step_and_its_operators(tiny_llama_dir: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.step_profile", "--quick"]
    command += ["--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = re.search(
        r"float32, 1 session\(s\) on cpu: a step takes (\S+) ms; its operators on the CPU "
        r"take (\S+) ms of it: (\S+)x the step",
        result.stdout,
    )
    assert summary, result.stdout
    wall, busy, share = (float(value) for value in summary.groups())
    assert 0 < busy and 0 < wall and is_printed_quotient(share, busy, wall, 2, 2)
    operators = re.findall(r"^\s+(\S+) ms\s+(\S+) calls  (\S+)", result.stdout, re.MULTILINE)
    assert len(operators) == 12
    times = [float(ms) for ms, _, _ in operators]
    assert times == sorted(times, reverse=True)
