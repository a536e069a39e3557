"""A step's inputs reach the device in one copy and its results come back in one
(SPEC's "never make the frontend wait on the device"): on a GPU each other copy from a
host list is a transfer of its own, and each read of a device value (``.item()``,
``bool()``, ``.tolist()``) waits for everything queued before it.

On the CPU nothing is copied, so the test watches what would be: every tensor made from
a host list (``aten.lift_fresh``, what ``torch.tensor(list)`` and list indexing do) and
every read of a value, outside the step's one upload (``Uploads.send``) and its one
read (``scoring.to_host``), over the features that shape a step: greedy and sampled
rows, seeds, top logprobs, readout, penalties, bias, min_tokens, a grammar, and
speculative verification."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from salience_client.pb import salience_pb2 as pb
from salience_server.engine import scoring, uploads
from tests.helpers import U32_MAX, generate, open_session, random_tokens
from tests.integration.test_readout import write_readout

WATCHED = {"aten.lift_fresh.default": "host list", "aten._local_scalar_dense.default": "read"}


class _Watch(TorchDispatchMode):
    """Counts the watched operators of the engine thread, outside the allowed zones."""

    def __init__(self, counts: collections.Counter[str], allowed: threading.local) -> None:
        super().__init__()
        self.counts = counts
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = WATCHED.get(str(func))
        if name is not None and not getattr(self.allowed, "depth", 0):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory) -> Iterator[tuple[Any, Any]]:
    from tests.conftest import start_server

    readout = write_readout(tmp_path_factory.mktemp("copies") / "readout.safetensors")
    options = dict(block_size=4, kv_cache_bytes=4 << 20, readout_path=str(readout))
    plain = start_server(str(tiny_llama_dir), **options)
    speculating = start_server(
        str(tiny_llama_dir),
        speculative="ngram",
        num_speculative_tokens=4,
        speculative_cost=(0.0, 0.0),  # always draft: every step verifies
        **options,
    )
    yield plain, speculating
    plain.stop()
    speculating.stop()


@pytest.fixture
def watch(servers, monkeypatch) -> Callable[[Any], collections.Counter[str]]:
    """Counts, over the engine steps of a server, the watched operators, the upload's
    sends and the result reads. The sampler takes a device's way (no reads of the host
    to find ties at the top-k cut, which are free on the CPU)."""
    counts: collections.Counter[str] = collections.Counter()
    allowed = threading.local()

    def zone(function: Callable[..., Any], name: str) -> Callable[..., Any]:
        def inside(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            allowed.depth = getattr(allowed, "depth", 0) + 1
            try:
                return function(*args, **kwargs)
            finally:
                allowed.depth -= 1

        return inside

    monkeypatch.setattr(scoring, "to_host", zone(scoring.to_host, "results read"))
    monkeypatch.setattr(uploads.Uploads, "send", zone(uploads.Uploads.send, "inputs sent"))
    monkeypatch.setattr(scoring, "_reads_host_freely", lambda device: False)
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> Any:
        if (
            not getattr(allowed, "depth", 0)
            and threading.current_thread().name == "salience-engine"
        ):
            counts["read"] += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def start(server: Any) -> collections.Counter[str]:
        engine = server.engine
        step, execute = engine.step, engine.runner.execute

        def watched_step() -> None:
            counts["watched steps"] += 1  # the loop calls the patched step (it once did not)
            with _Watch(counts, allowed):
                step()

        def counted_execute(*args: Any) -> Any:
            counts["steps"] += 1  # a step with a forward pass (before its Done is sent)
            return execute(*args)

        monkeypatch.setattr(engine, "step", watched_step)
        monkeypatch.setattr(engine.runner, "execute", counted_execute)
        counts.clear()  # what came before (the prompt's step)
        return counts

    return start


WORKLOADS = {
    "greedy": {},
    "top logprobs and readout": dict(
        logprob_top_k=5, logprobs_ranges=[(0, U32_MAX)], readout_ranges=[(0, U32_MAX)]
    ),
    "sampled": dict(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01),
    "seeded": dict(temperature=0.8, seed=3),
    "penalties, bias and min_tokens": dict(
        temperature=0.7,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logit_bias={65: 2.0},
        min_tokens=4,
        stop_token_ids=[66],
    ),
    "grammar": dict(constraint=pb.Constraint(regex="[0-9]{12}")),
}


@pytest.mark.parametrize("speculating", [False, True], ids=["plain", "speculating"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_a_step_sends_its_inputs_once_and_reads_its_results_once(
    servers, watch, speculating: bool, workload: str
) -> None:
    server = servers[speculating]
    stub = server.stub
    session_id = open_session(stub)
    prompt = random_tokens(6, seed=3) * 3  # the tiny model goes on repeating it: drafts pass
    generate(stub, session_id, append_tokens=prompt, max_tokens=0)
    counts = watch(server)
    options = dict(max_tokens=40, ignore_eos=True) | WORKLOADS[workload]
    tokens, done = generate(stub, session_id, offset=len(prompt), **options)
    assert done.completion_tokens == len([t for t in tokens if not t.is_prefill]) > 0
    if speculating and workload == "greedy":
        assert done.accepted_tokens > 0  # the steps verified drafts
    steps = counts.pop("steps")
    assert steps > 0 and counts.pop("watched steps") >= steps
    assert dict(counts) == {"inputs sent": steps, "results read": steps}, (
        f"per {steps} steps: {dict(counts)}"
    )
