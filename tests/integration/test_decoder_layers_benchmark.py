"""benchmarks/decoder_layers.py runs both forwards and reports their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import is_printed_quotient

ROOT = Path(__file__).resolve().parents[2]


def test_prints_both_forwards_and_their_ratio(tiny_llama_dir: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.decoder_layers", "--quick"]
    command += ["--model", str(tiny_llama_dir), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = re.findall(
        r"(\S+) batch (\d): lean\s+(\S+) ms/step, transformers' layers\s+(\S+) ms/step, "
        r"lean/transformers (\S+)",
        result.stdout,
    )
    assert [(dtype, batch) for dtype, batch, *_ in rows] == [
        ("float32", "1"),
        ("float32", "8"),
        ("bfloat16", "1"),
        ("bfloat16", "8"),
    ], result.stdout
    for _, _, ours, theirs, ratio in rows:
        assert float(ours) > 0 and float(theirs) > 0
        assert is_printed_quotient(float(ratio), float(ours), float(theirs), 2, 3)
