"""Smoke test of ``benchmarks/peers.py --quick`` against Salience and transformers serve,
then ``benchmarks/plot.py`` on what it wrote. On a tiny model, to keep CI short; no
timing is asserted, only that every workload ran (or was reported as impossible), the
table was printed, the JSON is whole, and no server was left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers.cli.serving")


@pytest.fixture(scope="module")
def quick_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.peers",
        "--quick",
        "--servers",
        "salience,transformers",
    ]
    command += ["--model", str(tiny_llama_dir), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, out


def test_prints_the_ratio_table(quick_run: tuple[str, Path]) -> None:
    stdout, _ = quick_run
    assert "Salience ÷ peer" in stdout
    for label in (
        "agent: total time",
        "throughput: output tok/s",
        "scoring: scored tok/s",
        "prefix reuse",
    ):
        assert label in stdout


def test_writes_every_figure_as_json(quick_run: tuple[str, Path]) -> None:
    _, out = quick_run
    run = json.loads(out.read_text())
    flavours = run["flavours"]
    assert set(flavours) == {
        "salience-http",
        "salience-grpc",
        "salience-grpc-resend",
        "transformers",
    }
    for name, flavour in flavours.items():
        assert flavour["status"] == "ok", (name, flavour.get("reason"))
        for workload, entry in flavour["workloads"].items():
            # transformers serve ignores echo + logprobs: reported, never given a number.
            expected = "unsupported" if (name, workload) == ("transformers", "scoring") else "ok"
            assert entry["status"] == expected, (name, workload, entry)
    agent = flavours["salience-grpc"]["workloads"]["agent"]
    sizes = run["sizes"]
    assert len(agent["turns"]) == sizes["num_conversations"] * sizes["num_turns"]
    assert [row["turn"] for row in agent["by_turn"]] == list(range(1, sizes["num_turns"] + 1))
    levels = flavours["transformers"]["workloads"]["throughput"]["levels"]
    assert [row["concurrency"] for row in levels] == list(sizes["throughput_levels"])
    # The same continuation scored through the shim and through a gRPC fork.
    http = flavours["salience-http"]["workloads"]["scoring"]["first_logprob_sum"]
    grpc = flavours["salience-grpc"]["workloads"]["scoring"]["first_logprob_sum"]
    assert http == pytest.approx(grpc, abs=1e-3)
    assert {row["peer"] for row in run["ratios"]} == {"transformers"}


def test_stops_every_server_it_started(quick_run: tuple[str, Path]) -> None:
    _, out = quick_run
    for flavour in json.loads(out.read_text())["flavours"].values():
        pid = flavour["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_plots_the_run(quick_run: tuple[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, out = quick_run
    subprocess.run(
        [sys.executable, "-m", "benchmarks.plot", str(out), "--out", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in ("agent_turn_latency.png", "throughput_concurrency.png", "ttft_history.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
