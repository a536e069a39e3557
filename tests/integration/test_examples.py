"""The scripts in examples/ run as the README says, against the default model's server
and its shim (each given their addresses on the command line)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.shim_support import RunningShim

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# What each prints when it works: a pattern its output must match.
EXPECTED = {
    "agent_session.py": r"\(sent \d+ tokens, \d+ already cached\)",
    "best_of_n.py": r"(?m)^ *-?\d+\.\d{3}  .+\n *-?\d+\.\d{3}  ",
    "score_choices.py": r"(?m)^ *-\d+\.\d{3}  London$",
    "embeddings.py": r"3 vectors of 576 values from the shim",
    "structured_output.py": r"parsed: name=.+\ntime: [0-2]\d:[0-5]\d",
    "openai_chat.py": r"\(\d+ prompt tokens, [1-9]\d* cached\)",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_example_runs(
    name: str, default_server: RunningServer, default_shim: RunningShim
) -> None:
    uses_shim = "openai" in (EXAMPLES / name).read_text()
    uses_grpc = "SalienceClient" in (EXAMPLES / name).read_text()
    args = [default_server.target] if uses_grpc else []
    args += [default_shim.base_url] if uses_shim else []
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(EXPECTED[name], result.stdout), result.stdout


def test_every_example_is_run() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(EXPECTED)
