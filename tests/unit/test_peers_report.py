"""``benchmarks/peers.py``: ``--add-to`` (a later run of one server joins an earlier
report of the same shapes, which keeps its other servers and says which run each came
from), and the scoring workload's time limit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import _openai_workloads as openai_workloads
from benchmarks import peers
from benchmarks._prompts import Plan
from benchmarks._sizes import FULL, QUICK


def _report(sizes: dict, flavours: dict, taken: str) -> dict:
    return {
        "taken": taken,
        "command": "python -m benchmarks.peers",
        "sizes": sizes,
        "model": {"id": "m", "directory": "d", "gguf": "m.gguf"},
        "versions": {"torch": "2.13.0", "transformers serve": "5"},
        "flavours": flavours,
    }


def test_a_later_run_adds_its_servers_to_the_earlier_report(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    earlier = {"salience-http": {"status": "ok"}, "transformers": {"status": "ok"}}
    path.write_text(json.dumps(_report(FULL.to_json(), earlier, "t0")))
    report = _report(FULL.to_json(), {}, "t1")
    report["versions"] = {"torch": "2.13.0", "llama-cpp server": "0.3.36"}

    peers._add_earlier(path, report)
    report["flavours"] |= {"llama-cpp": {"status": "ok"}}

    assert list(report["flavours"]) == ["salience-http", "transformers", "llama-cpp"]
    assert report["earlier_runs"] == [
        {
            "taken": "t0",
            "command": "python -m benchmarks.peers",
            "servers": ["salience-http", "transformers"],
        }
    ]
    assert report["versions"]["transformers serve"] == "5"
    assert report["versions"]["llama-cpp server"] == "0.3.36"


def test_other_shapes_or_no_report_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    with pytest.raises(SystemExit, match="no earlier report"):
        peers._add_earlier(path, _report(FULL.to_json(), {}, "t1"))
    path.write_text(json.dumps(_report(QUICK.to_json(), {}, "t0")))
    with pytest.raises(SystemExit, match="other shapes"):
        peers._add_earlier(path, _report(FULL.to_json(), {}, "t1"))


class _OneAtATimeServer:
    """An openai client stand-in whose /v1/completions answers one request at a time,
    slowly, as llama-cpp-python's server scores (each word of a prompt logprob -1)."""

    def __init__(self, seconds_each: float) -> None:
        self.seconds_each = seconds_each
        self.busy = asyncio.Lock()
        self.completions = SimpleNamespace(create=self.create)

    async def create(self, prompt: str, **_: object) -> SimpleNamespace:
        async with self.busy:
            await asyncio.sleep(self.seconds_each)
        offsets = [i for i, c in enumerate(prompt) if c != " " and (i == 0 or prompt[i - 1] == " ")]
        logprobs = SimpleNamespace(
            text_offset=offsets + [len(prompt)], token_logprobs=[None] + [-1.0] * len(offsets)
        )
        return SimpleNamespace(
            choices=[SimpleNamespace(logprobs=logprobs)], usage=SimpleNamespace(completion_tokens=1)
        )


def test_scoring_stops_at_its_time_limit_and_rates_what_was_scored() -> None:
    sizes = dataclasses.replace(
        QUICK, num_continuations=8, scoring_concurrency=4, scoring_time_limit_s=0.5
    )
    continuations = [f" word{i} more{i}" for i in range(8)]
    plan = Plan(sizes, "", [], {}, "doc", continuations, "", [])
    texts = SimpleNamespace(count=lambda text: len(text.split()))
    server = _OneAtATimeServer(seconds_each=0.25)

    result = asyncio.run(openai_workloads.scoring(server, "m", plan, texts, "slow"))  # type: ignore[arg-type]

    # 0.25 s a request, one at a time: about 2 are scored by the 0.5 s limit (all 8 would
    # take 2 s); the rest are cancelled, and the rate is over those scored.
    num_scored = result["scored_tokens"] // 2
    assert 0 < num_scored < 8
    assert result["wall_s"] < 1.5
    assert result["scored_tok_s"] == result["scored_tokens"] / result["wall_s"]
    assert result["first_logprob_sum"] == -2.0
    assert result["note"].startswith(f"{num_scored} of 8 continuations scored")
