"""Property-based fuzzing of readout (SPEC 2.3) with the other Generate features, at
once and under memory pressure, against transformers.

A real server of the tiny Llama reads out both its layers (the last before the final
norm), verifies n-gram drafts at every step it can, and has a KV pool of about one
session and a host budget of two, so calls offload, drop, recompute and preempt one
another. Each example opens a few sessions, then runs rounds of calls, one per session
and all at once (they share steps): Generate calls drawn from
``fuzz_strategies.readout_request`` (rewinds, prefill only, scored ranges with top-k,
stop strings, sampling, odd fields), forks, closes, cancels and an Embed beside them.
Each refusal is a SPEC status (``test_fuzz_grpc``'s check). Each stream owes the
positions of its ranges and its decoded tokens once each, in order; every readout is
the projection of one plain transformers forward pass over the session's tokens, read
at the position before (1e-4), empty at position 0 and outside the readout ranges;
every logprob and top-k entry is that pass's too. The example ends as
``test_fuzz_grpc``'s do: lengths agree, nothing leaks, nothing is logged.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from salience_client.pb import salience_pb2 as pb
from salience_server.engine.readout import load_readout
from tests import fuzz_strategies as fs
from tests.conftest import RunningServer, start_server
from tests.helpers import error_reason
from tests.integration.test_fuzz_grpc import (
    DEADLINE_S,
    FUZZ,
    ErrorLog,
    Fuzzer,
    close_all,
    errors,  # noqa: F401 (a fixture)
)
from tests.integration.test_readout import LAYERS, write_readout
from tests.tiny_models import reference_model

TOLERANCE = 1e-4
TOKEN_BYTES = 512  # 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes


class Oracle:
    """Readout, logprobs and final states of one plain forward pass per token list."""

    def __init__(self, model: Any, vectors: torch.Tensor) -> None:
        self.model, self.vectors = model, vectors  # [n_layers, n_concepts, hidden]
        self.lock = threading.Lock()
        self.cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([L, n_layers, n_concepts] readout, [L, V] logprobs, [L, H] final states)."""
        key = tuple(token_ids)
        with self.lock:
            if key not in self.cache:
                self.cache[key] = self._forward(token_ids)
            return self.cache[key]

    def _forward(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last: dict[str, torch.Tensor] = {}
        layers: Any = self.model.model.layers
        hook = layers[-1].register_forward_hook(
            lambda m, i, o: last.__setitem__("state", (o[0] if isinstance(o, tuple) else o)[0])
        )
        try:
            with torch.no_grad():
                output = self.model(torch.tensor([token_ids]), output_hidden_states=True)
        finally:
            hook.remove()
        # Layer i is hidden_states[i + 1], but the last layer's is read before the norm.
        states = [
            last["state"] if i == len(layers) - 1 else output.hidden_states[i + 1][0]
            for i in LAYERS
        ]
        readout = torch.einsum("lph,lch->plc", torch.stack(states).float(), self.vectors)
        logprobs = torch.log_softmax(output.logits[0].float(), dim=-1)
        return readout, logprobs, output.hidden_states[-1][0].float()


def in_ranges(position: int, ranges: Any) -> bool:
    return any(r.start <= position < r.end for r in ranges)


class ReadoutFuzzer(Fuzzer):
    """A Fuzzer that knows each session's tokens and checks every stream on them."""

    def __init__(self, server: RunningServer, error_log: ErrorLog, oracle: Oracle) -> None:
        super().__init__(server, error_log)
        self.oracle = oracle
        self.tokens: dict[str, list[int]] = {}

    def checked(self, request: pb.GenerateRequest, events: list[pb.GenerateEvent]) -> None:
        tokens = [e.token for e in events[:-1]]
        done = events[-1].done
        base = self.tokens.get(request.session_id, [])[: request.offset]
        assert len(base) == request.offset, "a call the server took at a wrong offset"
        prompt = base + list(request.append_tokens)
        final = prompt + [t.id for t in tokens if not t.is_prefill]
        self.tokens[request.session_id] = final
        assert done.total_tokens == len(final)
        scored = list(request.logprobs_ranges) + list(request.readout_ranges)
        first = min([request.offset] + [r.start for r in scored])
        owed = [p for p in range(first, len(prompt)) if in_ranges(p, scored)]
        assert [t.position for t in tokens] == owed + list(range(len(prompt), len(final)))
        if not tokens:
            return
        readout, logprobs, _ = self.oracle(final)
        for token in tokens:
            position = token.position
            assert token.id == final[position]
            if position == 0 or not in_ranges(position, request.readout_ranges):
                assert not token.readout, position
            else:
                got = torch.tensor(list(token.readout)).view(readout.shape[1:])
                assert (got - readout[position - 1]).abs().max().item() < TOLERANCE, position
            scored = not token.is_prefill or in_ranges(position, request.logprobs_ranges)
            if position == 0 or not scored:  # read out only: no logits computed
                assert token.sampled_logprob == 0.0 and not token.top_logprobs, position
                continue
            want = logprobs[position - 1]
            assert abs(token.sampled_logprob - want[token.id].item()) < TOLERANCE, position
            for entry in token.top_logprobs:
                assert abs(entry.logprob - want[entry.token_id].item()) < TOLERANCE, position
            top_k = request.logprob_top_k if in_ranges(position, request.logprobs_ranges) else 0
            assert len(token.top_logprobs) == top_k, position

    def learn(self, session_id: str) -> None:
        """Reads a session's tokens back (after a cancel left them unknown): a call that
        scores every position and changes nothing."""
        length = self.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.length
        request = pb.GenerateRequest(
            session_id=session_id,
            offset=length,
            logprobs_ranges=[pb.PositionRange(start=0, end=fs.U32_MAX)],
        )
        events = list(self.stub.Generate(request, timeout=DEADLINE_S))
        self.tokens[session_id] = [e.token.id for e in events[:-1]]
        self.lengths[session_id] = length

    def embed(self, request: pb.EmbedRequest) -> None:
        """An Embed of token lists, checked against the final states."""
        response = self.stub.Embed(request, timeout=DEADLINE_S)
        for token_ids, embedding in zip(request.token_lists, response.embeddings, strict=True):
            states = self.oracle(list(token_ids.token_ids))[2]
            want = states[-1] if request.pooling == pb.POOLING_LAST else states.mean(dim=0)
            if request.normalize:
                want = torch.nn.functional.normalize(want, dim=0)
            assert (torch.tensor(list(embedding.values)) - want).abs().max() < TOLERANCE


@pytest.fixture(scope="module")
def readout_server(tiny_llama_dir: Any, tmp_path_factory: Any) -> Iterator[RunningServer]:
    path = write_readout(tmp_path_factory.mktemp("fuzz-readout") / "readout.safetensors")
    server = start_server(
        str(tiny_llama_dir),
        readout_path=str(path),
        block_size=4,
        kv_cache_bytes=32 * TOKEN_BYTES,
        host_kv_bytes=16 * TOKEN_BYTES,
        max_batch_tokens=24,
        speculative="ngram",
        num_speculative_tokens=3,
        speculative_cost=(0.0, 0.0),  # draft whenever the history allows
    )
    vectors = load_readout(path, 2, 64).vectors
    server.extra["oracle"] = Oracle(reference_model(tiny_llama_dir), vectors)
    yield server
    server.stop()


def embed_request() -> st.SearchStrategy[pb.EmbedRequest]:
    lists = st.lists(
        st.builds(pb.TokenIds, token_ids=st.lists(st.integers(3, 255), min_size=1, max_size=12)),
        min_size=1,
        max_size=3,
    )
    pooling = st.sampled_from([pb.POOLING_LAST, pb.POOLING_MEAN])
    return st.builds(pb.EmbedRequest, token_lists=lists, pooling=pooling, normalize=st.booleans())


SLOTS = 4
"""Calls drawn per round: each picks a session by index (a second call on a session
already called in the round is dropped), so that what is drawn does not depend on the
sessions the round before left (a fork may fail under pressure, a cancel lands when
it lands)."""


def round_calls(fuzzer: ReadoutFuzzer, data: st.DataObject) -> list[tuple[str, Any, Any]]:
    """At most one call per live session (method, request, cancel after), and maybe an
    Embed. Without live sessions, the calls go to an unknown one."""
    calls: list[tuple[str, Any, Any]] = []
    live = sorted(fuzzer.lengths) or ["unknown"]
    called = set()
    for _ in range(SLOTS):
        session_id = live[data.draw(st.integers(0, 7), label="session") % len(live)]
        kind = data.draw(st.sampled_from(["read"] * 5 + ["cancel", "fork", "close"]))
        length = fuzzer.lengths.get(session_id, 0)
        request = data.draw(fs.readout_request(session_id, length), label="readout call")
        cancel = data.draw(st.integers(0, 3), label="cancel after")
        if session_id in called:
            continue
        called.add(session_id)
        if kind == "fork":
            calls.append(("ForkSession", pb.ForkSessionRequest(session_id=session_id), None))
        elif kind == "close":
            calls.append(("CloseSession", pb.CloseSessionRequest(session_id=session_id), None))
        else:
            calls.append(("Generate", request, cancel if kind == "cancel" else None))
    if data.draw(st.booleans(), label="embed"):
        calls.append(("Embed", data.draw(embed_request(), label="embed call"), None))
    return calls


def one_call(fuzzer: ReadoutFuzzer, method: str, request: Any, cancel: int | None) -> Any:
    """Makes one call of a round, checking what it returns; raises what it raises."""
    if method == "Generate" and cancel is not None:
        return fuzzer.cancel(request, cancel)
    if method == "Generate":
        return fuzzer.generate(request)
    if method == "Embed":
        return fuzzer.embed(request)
    return getattr(fuzzer.stub, method)(request, timeout=DEADLINE_S)


def run_round(fuzzer: ReadoutFuzzer, calls: list[tuple[str, Any, Any]]) -> None:
    """Runs ``calls`` at once; checks each outcome (here, where hypothesis may note it)."""
    outcomes: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            outcomes[index] = call()
        except Exception as error:  # an RpcError is checked below, the rest raised
            outcomes[index] = error

    threads = [
        threading.Thread(target=run, args=(index, functools.partial(one_call, fuzzer, *call)))
        for index, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S * 2)
        assert not thread.is_alive(), "a call that did not end"
    for (method, request, cancel), outcome in zip(calls, outcomes, strict=True):
        if isinstance(outcome, grpc.RpcError):
            event(f"{method}: {outcome.code().name} {error_reason(outcome)}")
            fuzzer.check_refusal(method, outcome)
            continue
        if isinstance(outcome, Exception):
            raise outcome
        event(f"{method}: OK")
        if method == "ForkSession":
            fuzzer.lengths[outcome.session_id] = outcome.length
            fuzzer.tokens[outcome.session_id] = list(fuzzer.tokens.get(request.session_id, []))
        elif method == "CloseSession":
            del fuzzer.lengths[request.session_id]
            fuzzer.tokens.pop(request.session_id, None)
        elif method == "Generate" and cancel is not None:
            fuzzer.learn(request.session_id)


@FUZZ
@given(data=st.data())
def test_fuzzed_readout_calls_at_once_equal_the_forward_pass(
    readout_server: RunningServer,
    errors: ErrorLog,  # noqa: F811
    data: st.DataObject,
) -> None:
    errors.records.clear()
    fuzzer = ReadoutFuzzer(readout_server, errors, readout_server.extra["oracle"])
    try:
        for _ in range(data.draw(st.integers(1, 4), label="sessions")):
            fuzzer.open(data.draw(st.lists(st.integers(3, 255), max_size=24), label="prefix"))
        for _ in range(data.draw(st.integers(1, 3), label="rounds")):
            run_round(fuzzer, round_calls(fuzzer, data))
        fuzzer.finish()
    finally:
        close_all(readout_server)
