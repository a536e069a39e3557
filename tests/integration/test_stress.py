"""A model-based stress test of the whole server (hypothesis stateful testing).

A tiny real Qwen2-VL (text and images, ``initializer_range`` 0.1) with a readout file
runs behind a real server whose KV pool holds about two sessions, so that nearly
every step offloads, drops, recomputes or preempts. Rules open, fork, generate (with
appends, rewinds, ranges before and after ``offset``, top-k, readout, stop tokens),
append images, cancel mid-stream, close and expire sessions, and run several calls at
once; the rules of ``tests/stress_cancel.py`` end calls at random moments (a cancel, a
deadline) and close sessions while their calls and forks run. The model of the state is each session's tokens and images; the oracle is one
plain transformers forward pass over them (both in ``tests/stress_model.py``). After
every call: the stream's events are exactly the positions owed, in order; every
logprob, top-k and readout equals the forward pass (1e-4); greedy tokens are its argmax. After every rule: each session's
length is the model's, nothing is busy, and the block pool and host budget balance.

It runs twice: without speculative decoding, and with n-gram speculation (whose
drafts must then change nothing). CI runs the "ci" profile (fixed seed);
``--hypothesis-profile=stress-long`` runs thousands of steps (see tests/conftest.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer, start_server
from tests.helpers import U32_MAX, error_reason
from tests.integration.test_fuzz_grpc import ErrorLog
from tests.integration.test_readout import write_readout
from tests.stress_cancel import CancelRules
from tests.stress_model import IMAGE_SIZE, READOUT_LAYER, Call, Oracle, SessionModel, check_call
from tests.tiny_models import build_tiny_vision_model, reference_vision_model
from tests.vision_support import encode, make_image

MAX_CONTEXT = 40
BLOCK_SIZE = 4
TOKEN_BYTES = 512  # 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes
IMAGE_BYTES = 4 * 64 * 4  # their embeddings: 4 x 64 float32
SESSION_TTL_S = 600.0


class StressMachine(CancelRules, RuleBasedStateMachine):
    server: RunningServer
    oracle: Oracle
    max_context = MAX_CONTEXT

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, SessionModel] = {}
        self.stub = self.server.stub

    # ----- rules ----------------------------------------------------------------------

    @rule(target=sessions)
    def open(self) -> str:
        response = self.stub.OpenSession(pb.OpenSessionRequest(max_context=MAX_CONTEXT))
        self.models[response.session_id] = SessionModel()
        return response.session_id

    @rule(target=sessions, parent=sessions)
    def fork(self, parent: str) -> str:
        child = self.stub.ForkSession(pb.ForkSessionRequest(session_id=parent))
        assert child.length == len(self.models[parent].token_ids)
        self.models[child.session_id] = self.models[parent].copy()
        return child.session_id

    @rule(session_id=sessions, data=st.data())
    def generate(self, session_id: str, data: st.DataObject) -> None:
        call = self._draw_call(session_id, data)
        events, done = self._run(call)
        self.models[session_id] = check_call(
            self.oracle, self.models[session_id], call, events, done
        )

    @rule(data=st.data())
    def concurrently(self, data: st.DataObject) -> None:
        """Two to four calls on distinct sessions at once: they share steps, and
        squeeze each other out of the pool."""
        live = list(self.models)  # in creation order (ids are random: sorting them is not)
        assume(len(live) >= 2)
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=2, max_size=4, unique=True))
        self._run_together([self._draw_call(session_id, data) for session_id in chosen])

    @rule(session_id=sessions, size=st.integers(12, 32), seed=st.integers(0, 2**16))
    def grow(self, session_id: str, size: int, seed: int) -> None:
        """A long prefill-only append: large sessions keep the small pool under pressure."""
        model = self.models[session_id]
        length = len(model.token_ids)
        append = [(seed * 7 + 13 * i) % 256 for i in range(min(size, MAX_CONTEXT - length))]
        assume(append)
        call = Call(session_id, length, append, 0, [(length, U32_MAX)], [], 0, [])
        events, done = self._run(call)
        self.models[session_id] = check_call(self.oracle, model, call, events, done)

    @rule(data=st.data())
    def contend(self, data: st.DataObject) -> None:
        """Two sessions grow together past what the pool holds: one is preempted, its
        KV evicted, and recomputed while its stream goes on."""
        live = list(self.models)
        assume(len(live) >= 2)
        first, second = data.draw(
            st.lists(st.sampled_from(live), min_size=2, max_size=2, unique=True)
        )
        calls = []
        for session_id in (first, second):
            model = self.models[session_id]
            length = len(model.token_ids)
            append = [(13 * i + length) % 256 for i in range(max(0, 30 - length))]
            room = MAX_CONTEXT - length - len(append)
            calls.append(
                Call(session_id, length, append, min(6, room), [(length, U32_MAX)], [], 0, [])
            )
        self._run_together(calls)

    def _run_together(self, calls: list[Call]) -> None:
        """Runs calls on distinct sessions at once, then checks each against the oracle."""
        results: dict[int, tuple] = {}

        def run(index: int) -> None:
            results[index] = self._run(calls[index])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for index, call in enumerate(calls):
            events, done = results[index]
            self.models[call.session_id] = check_call(
                self.oracle, self.models[call.session_id], call, events, done
            )

    @rule(session_id=sessions, seed=st.integers(0, 3))
    def append_image(self, session_id: str, seed: int) -> None:
        model = self.models[session_id]
        length = len(model.token_ids)
        assume(length + 6 <= MAX_CONTEXT)
        info = self.oracle.info
        self._prefill(session_id, length, [info.vision_start_token_id])
        model.token_ids.append(info.vision_start_token_id)
        engine = self.server.engine
        try:
            response = self.stub.AppendImage(
                pb.AppendImageRequest(
                    session_id=session_id,
                    image=encode(make_image(seed, IMAGE_SIZE)),
                    mime_type="image/png",
                    offset=length + 1,
                )
            )
        except grpc.RpcError as error:  # refused only when the images fill the host budget
            assert error_reason(error) == "HOST_MEMORY_FULL"
            with engine._lock:
                held = engine.images.num_bytes()
            assert held + IMAGE_BYTES > engine.evictor.host_kv_bytes
            return
        assert response.placeholder_count == 4
        self._prefill(session_id, length + 5, [info.vision_end_token_id])
        model.token_ids += [info.image_pad_token_id] * 4 + [info.vision_end_token_id]
        model.images.append((length + 1, seed))

    @rule(session_id=sessions, num_read=st.integers(1, 3))
    def cancel_mid_stream(self, session_id: str, num_read: int) -> None:
        """A greedy stream cancelled after a few events: whatever it committed stays
        committed, and is exactly the greedy continuation."""
        model = self.models[session_id]
        length = len(model.token_ids)
        assume(0 < length <= MAX_CONTEXT - 8)
        stream = self.stub.Generate(
            pb.GenerateRequest(
                session_id=session_id, offset=length, max_tokens=MAX_CONTEXT, ignore_eos=True
            )
        )
        received = [next(stream).token for _ in range(num_read)]
        stream.cancel()
        now = self._wait_idle(session_id)
        assert now >= length + num_read
        events, _ = self._run(
            Call(session_id, now, [], 0, [(length + 1, now)], [], 0, []), scoring_only=True
        )
        tail = [e.id for e in events]
        assert tail[: num_read - 1] == [t.id for t in received[1:]]
        after = SessionModel(model.token_ids + [received[0].id] + tail, list(model.images))
        logprobs, _ = self.oracle.forward(after)
        for position in range(length, now):
            assert after.token_ids[position] == int(logprobs[position - 1].argmax())
        # How far it got after the cancel depends on timing: rewind to what was read,
        # so that the machine's state (and what it draws next) is reproducible.
        kept = length + num_read
        self._run(Call(session_id, kept, [], 0, [], [], 0, []))
        self.models[session_id] = SessionModel(after.token_ids[:kept], list(model.images))

    @rule(session_id=consumes(sessions))
    def close(self, session_id: str) -> None:
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        del self.models[session_id]

    @rule(session_id=consumes(sessions))
    def expire(self, session_id: str) -> None:
        engine = self.server.engine
        with engine._lock:
            engine.sessions[session_id].last_used -= SESSION_TTL_S + 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the session did not expire")
        del self.models[session_id]

    # ----- invariants -------------------------------------------------------------------

    @invariant()
    def sessions_match_the_model(self) -> None:
        listing = {
            s.session_id: s for s in self.stub.ListSessions(pb.ListSessionsRequest()).sessions
        }
        for session_id, model in self.models.items():
            info = listing[session_id]
            assert info.length == len(model.token_ids) and not info.busy

    @invariant()
    def memory_balances(self) -> None:
        engine = self.server.engine
        with engine._lock:
            assert not engine.scheduler.has_work()
            engine.block_manager.check_invariants([s.block_table for s in engine.sessions.values()])
            offloaded = sum(s.host_kv_bytes for s in engine.sessions.values())
            assert engine.evictor.host_bytes_used == offloaded + engine.images.num_bytes()
            assert set(engine.runner.host_kv) == {
                s.session_id for s in engine.sessions.values() if s.host_kv_bytes
            }

    def teardown(self) -> None:
        for session_id in list(self.models):
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))

    # ----- helpers ----------------------------------------------------------------------

    def _draw_call(self, session_id: str, data: st.DataObject) -> Call:
        model = self.models[session_id]
        offset = data.draw(
            st.sampled_from(model.rewind_points()) | st.just(len(model.token_ids)), label="offset"
        )
        # Or a stretch of the session's own text again, whose continuation n-gram drafts
        # propose and the tiny model, repeating itself, often accepts.
        own = [token for token in model.token_ids if token < 256]
        again = st.integers(0, len(own)).map(lambda start: own[start : start + 16])
        append = data.draw(st.lists(st.integers(0, 255), max_size=16) | again, label="append")
        append = append[: MAX_CONTEXT - offset]
        prompt_len = offset + len(append)
        max_tokens = data.draw(st.integers(0, min(6, MAX_CONTEXT - prompt_len)), label="max_tokens")
        if prompt_len == 0:
            max_tokens = 0
        end = prompt_len + max_tokens
        point = st.integers(0, max(end, 1))
        pair = st.tuples(point, point | st.just(U32_MAX)).map(lambda p: (p[0], max(p)))
        logprobs_ranges = data.draw(st.lists(pair, max_size=2), label="logprobs_ranges")
        readout_ranges = data.draw(st.lists(pair, max_size=1), label="readout_ranges")
        top_k = data.draw(st.integers(0, 3), label="top_k")
        stop = data.draw(st.lists(st.integers(0, 255), max_size=2), label="stop_token_ids")
        return Call(
            session_id, offset, append, max_tokens, logprobs_ranges, readout_ranges, top_k, stop
        )

    def _run(self, call: Call, scoring_only: bool = False) -> tuple[list[pb.Token], pb.Done]:
        events, done = [], None
        for event in self.stub.Generate(call.request(), timeout=120):
            if event.HasField("token"):
                events.append(event.token)
            else:
                done = event.done
        assert done is not None
        return events, done

    def _prefill(self, session_id: str, offset: int, token_ids: list[int]) -> None:
        self._run(Call(session_id, offset, token_ids, 0, [], [], 0, []))

    def _wait_idle(self, session_id: str) -> int:
        """The session's length once its cancelled call has wound down."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = self.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
            if not info.busy:
                return info.length
            time.sleep(0.005)
        raise AssertionError("a cancelled call kept its session busy")


@pytest.fixture(scope="module", params=["plain", "speculative"])
def stress_server(request, tmp_path_factory) -> RunningServer:
    model_dir: Path = build_tiny_vision_model(tmp_path_factory.mktemp("stress-vl"), "qwen2_vl")
    readout_path = write_readout(
        tmp_path_factory.mktemp("stress-readout") / "readout.safetensors", layers=[READOUT_LAYER]
    )
    server = start_server(
        str(model_dir),
        readout_path=str(readout_path),
        block_size=BLOCK_SIZE,
        kv_cache_bytes=12 * BLOCK_SIZE * TOKEN_BYTES,  # 48 tokens: one full session
        host_kv_bytes=24 * TOKEN_BYTES + 4 * IMAGE_BYTES,  # some offloads, the rest dropped
        max_batch_tokens=16,  # prefills in chunks, beside decodes
        session_ttl_s=SESSION_TTL_S,
        speculative="ngram" if request.param == "speculative" else "",
        speculative_cost=(0.0, 0.0),
        prompt_lookup_min=1,  # drafts wherever the last token occurred before: many
    )
    server.extra["reference"] = reference_vision_model(model_dir)
    yield server
    server.stop()


def test_stress(stress_server: RunningServer) -> None:
    from safetensors.torch import load_file

    vectors = next(iter(load_file(str(stress_server.server.config.readout_path)).values()))
    StressMachine.server = stress_server
    StressMachine.oracle = Oracle(stress_server, vectors)
    # Nothing the machine does is a failure of the server's own. gRPC's core logs (its
    # own logger) a write to a stream whose client cancelled just then: not the server's.
    errors = ErrorLog()
    logging.getLogger("salience_server").addHandler(errors)
    try:
        StressMachine.TestCase().runTest()
    finally:
        logging.getLogger("salience_server").removeHandler(errors)
    assert not errors.records, [record.getMessage() for record in errors.records]
    engine = stress_server.engine
    exercised = {  # what the run went through (pytest -s shows it)
        "accepted drafts": engine.metrics.accepted_tokens._value.get()
        if engine.config.speculative
        else "off",
        "preemptions": engine.scheduler.num_preemptions,
        "recomputed tokens": engine.metrics.recomputed_tokens._value.get(),
        "swap-outs": engine.runner.num_swap_outs,
        "swap-ins": engine.runner.num_swap_ins,
    }
    print(exercised)
    assert all(exercised.values()), "the pool was not tight enough to exercise memory pressure"
