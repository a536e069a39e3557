"""The stress test's cancellation and lifecycle rules (``tests/integration/test_stress.py``
mixes them into its machine): calls cancelled, or past their deadline, at a random
moment (in a prefill, a decode, a verification of drafts, a swap of KV, an image's
encoding), then at once the session's next call, a fork of it or nothing; sessions
closed while a call and a fork of them run.

What a cancelled call leaves (SPEC 2.1): nothing if the server never accepted it, else
its append and the tokens it decoded before the cancel reached the engine, every one of
them the greedy continuation, the ones the stream delivered among them. The machine
then rewinds the session to the call's offset, so that its state (and what it draws
next) does not depend on timing; the invariants after each rule (nothing busy, the
block pool and the host budget balance) hold whatever the timing was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, rule

from salience_client.pb import salience_pb2 as pb
from tests.helpers import U32_MAX, engine_held_in_a_step, error_reason
from tests.stress_model import IMAGE_SIZE, TOLERANCE, Call, SessionModel, check_call
from tests.vision_support import encode, make_image

ENDED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
CLOSED_REASONS = {"SESSION_CLOSED", "SESSION_NOT_FOUND"}
T = TypeVar("T")

# How a call ends early: ("cancel", s) cancels it s seconds after it starts,
# ("deadline", s) gives it that deadline, ("read", n) cancels it after n events.
EARLY_END = st.one_of(
    st.tuples(st.just("cancel"), st.floats(0.0, 0.03)),
    st.tuples(st.just("deadline"), st.floats(0.001, 0.04)),
    st.tuples(st.just("read"), st.integers(1, 4)),
)


def _read_early(stream, how: tuple[str, float]) -> tuple[list[pb.Token], pb.Done | None]:
    """Reads ``stream`` until ``how`` ends it (or its Done comes first)."""
    kind, amount = how
    timer = threading.Timer(amount, stream.cancel) if kind == "cancel" else None
    if timer is not None:
        timer.start()
    events, done = [], None
    try:
        for event in stream:
            if event.HasField("done"):
                done = event.done
                continue
            events.append(event.token)
            if kind == "read" and len(events) >= amount:
                stream.cancel()
                break
    except grpc.RpcError as error:
        assert error.code() in ENDED, (error.code(), error.details())
    if timer is not None:
        timer.cancel()
    return events, done


def _rest_of(stream) -> list[pb.Token]:
    """The events left in a stream the client cancelled (or that ended)."""
    events = []
    try:
        for event in stream:
            if event.HasField("token"):
                events.append(event.token)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.CANCELLED, error.details()
    return events


class CancelRules:
    """Rules of ``StressMachine``: they use its models, stub, oracle and helpers."""

    max_context: int

    sessions = Bundle("sessions")  # the machine's bundle (bundles go by name)

    @rule(
        session_id=sessions,
        data=st.data(),
        how=EARLY_END,
        then=st.sampled_from(["wait", "call", "fork"]),
    )
    def cancel_at_random(
        self, session_id: str, data: st.DataObject, how: tuple[str, float], then: str
    ) -> None:
        """A call ended early at a random moment; then the session's next call at once
        (it rewinds to the call's offset and decodes: the oracle's greedy tokens and
        logprobs), a fork of it at once, or a look at what the call committed. Then the
        session goes back to the call's offset, however the call ended: what the machine
        draws next must not depend on timing."""
        model = self.models[session_id]
        call = self._draw_long_call(model, session_id, data)
        kind, amount = how
        timeout = amount if kind == "deadline" else 120
        events, done = _read_early(self.stub.Generate(call.request(), timeout=timeout), how)
        if done is not None:  # it ended before the cancel: a whole call
            check_call(self.oracle, model, call, events, done)
        elif then == "call":  # at once, rewinding to the call's offset
            append = call.append[:4]
            room = self.max_context - call.offset - len(append)
            max_tokens = min(2, room) if call.offset + len(append) else 0
            again = Call(session_id, call.offset, append, max_tokens, [(0, U32_MAX)], [], 0, [])
            check_call(
                self.oracle, model, again, *self._at_once(session_id, lambda: self._run(again))
            )
        elif then == "fork":  # at once: the fork waits for the call to wind down
            fork = pb.ForkSessionRequest(session_id=session_id)
            child = self._at_once(session_id, lambda: self.stub.ForkSession(fork))
            self._wait_idle(session_id)
            held = self._held(session_id)
            assert self._held(child.session_id) == held and child.length == len(held)
            self._check_committed(model, call, events, held)
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=child.session_id))
        else:
            self._wait_idle(session_id)
            self._check_committed(model, call, events, self._held(session_id))
        self._run(Call(session_id, call.offset, [], 0, [], [], 0, []))
        self.models[session_id] = SessionModel(
            model.token_ids[: call.offset],
            [(start, seed) for start, seed in model.images if start < call.offset],
        )
        self._wait_engine_idle()

    @rule(session_id=sessions, data=st.data(), reads=st.integers(0, 3))
    def cancel_in_a_step(self, session_id: str, data: st.DataObject, reads: int) -> None:
        """A call cancelled while the engine is inside one of its steps (held in the
        forward pass until the cancel has reached the engine): it stops there. The
        session holds exactly what it held when that step began (the step's own
        results are not committed), and nothing after."""
        model = self.models[session_id]
        call = self._draw_long_call(model, session_id, data)
        engine = self.server.engine
        stream = self.stub.Generate(call.request(), timeout=120)
        events, done = [], None
        while done is None and len(events) < reads:
            event = next(stream)
            if event.HasField("done"):
                done = event.done
            else:
                events.append(event.token)
        held = None
        with engine_held_in_a_step(engine) as in_step:
            while done is None and not in_step.wait(0.005):
                with engine._lock:
                    if not engine.scheduler.has_work():
                        break  # it ended in the step under way
            if in_step.is_set():
                held = self._held(session_id)  # the step's forward runs without the lock
                stream.cancel()
                deadline = time.monotonic() + 10
                while not self._owner_cancelled(session_id):
                    assert time.monotonic() < deadline, "the cancel never reached the engine"
                    time.sleep(0.002)
        for event in _rest_of(stream):
            events.append(event)
        self._wait_idle(session_id)
        if held is not None:
            assert self._held(session_id) == held, "the call went on after its cancel"
            self._check_committed(model, call, events, held)
        self._run(Call(session_id, call.offset, [], 0, [], [], 0, []))
        self.models[session_id] = SessionModel(
            model.token_ids[: call.offset],
            [(start, seed) for start, seed in model.images if start < call.offset],
        )
        self._wait_engine_idle()

    @rule(
        session_id=consumes(sessions),
        data=st.data(),
        delay=st.floats(0.0, 0.05),
        forks=st.booleans(),
    )
    def close_during_call(
        self, session_id: str, data: st.DataObject, delay: float, forks: bool
    ) -> None:
        """A session closed while its call runs (or waits, or has just ended), and a fork
        of it is asked for meanwhile: the call ends with its Done or CANCELLED
        (SESSION_CLOSED); the fork is refused (busy, gone) or holds what the session
        held then."""
        call = self._draw_call(session_id, data)
        model = self.models.pop(session_id)
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(self._run(call))
            except grpc.RpcError as error:
                outcome.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(delay)
        forked = None
        if forks:
            try:
                forked = self.stub.ForkSession(pb.ForkSessionRequest(session_id=session_id))
            except grpc.RpcError as error:
                assert error_reason(error) in CLOSED_REASONS | {"SESSION_BUSY"}, error.details()
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        thread.join(timeout=60)
        assert not thread.is_alive(), "a call on a closed session hangs"
        (result,) = outcome
        after = None
        if isinstance(result, grpc.RpcError):  # closed before it was taken, or during it
            assert error_reason(result) in CLOSED_REASONS, (result.code(), result.details())
        else:
            after = check_call(self.oracle, model, call, *result)
        if forked is not None:
            child = self._held(forked.session_id)
            assert child in (model.token_ids, after.token_ids if after else None), child
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=forked.session_id))
        self._wait_engine_idle()

    @rule(session_id=sessions, seed=st.integers(0, 3), timeout=st.floats(0.001, 0.03))
    def image_past_its_deadline(self, session_id: str, seed: int, timeout: float) -> None:
        """An AppendImage whose deadline passes at a random moment (in its encoding, in
        its queue, in its prefill): if the server took the image, its KV scores as the
        oracle's; either way the session is then rewound to before the image."""
        model = self.models[session_id]
        length = len(model.token_ids)
        if length + 6 > self.max_context:
            return
        info = self.oracle.info
        self._prefill(session_id, length, [info.vision_start_token_id])
        try:
            self.stub.AppendImage(
                pb.AppendImageRequest(
                    session_id=session_id,
                    image=encode(make_image(seed, IMAGE_SIZE)),
                    mime_type="image/png",
                    offset=length + 1,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as error:
            assert (
                error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                or error_reason(error) == "HOST_MEMORY_FULL"
            ), (error.code(), error.details())
        held = self._wait_idle(session_id)
        assert held in (length + 1, length + 5)
        if held == length + 5:  # taken: its placeholders' KV and the end token score
            with_image = SessionModel(
                model.token_ids + [info.vision_start_token_id] + [info.image_pad_token_id] * 4,
                model.images + [(length + 1, seed)],
            )
            end = Call(
                session_id, held, [info.vision_end_token_id], 1, [(length, held + 1)], [], 0, []
            )
            events, done = self._run(end)
            check_call(self.oracle, with_image, end, events, done)
        self._run(Call(session_id, length, [], 0, [], [], 0, []))
        self._wait_engine_idle()

    # ----- helpers ----------------------------------------------------------------------

    def _at_once(self, session_id: str, action: Callable[[], T]) -> T:
        """``action`` at once after a cancel. The server waits a moment (0.1 s) for a
        cancel to arrive before it refuses the next call SESSION_BUSY, which a machine
        loaded by other work may pass: the call then waits for the cancelled one to end
        and is made again (what it must answer is checked either way)."""
        try:
            return action()
        except grpc.RpcError as error:
            if error_reason(error) != "SESSION_BUSY":
                raise
        self._wait_idle(session_id)
        return action()

    def _wait_engine_idle(self) -> None:
        """Until the engine holds no request: one cancelled, or whose session was
        closed, leaves at the engine's next step."""
        engine = self.server.engine
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with engine._lock:
                if not engine.scheduler.has_work():
                    return
            time.sleep(0.005)
        raise AssertionError("a call ended early stays in the engine")

    def _draw_long_call(self, model: SessionModel, session_id: str, data: st.DataObject) -> Call:
        """A call that runs for several steps: prefill chunks, then a dozen decodes."""
        offset = data.draw(st.sampled_from(model.rewind_points()), label="offset")
        append = data.draw(st.lists(st.integers(0, 255), max_size=24), label="append")
        append = append[: self.max_context - offset]
        end = offset + len(append)
        max_tokens = min(12, self.max_context - end) if end else 0
        ranges = data.draw(st.sampled_from([[], [(offset, U32_MAX)]]), label="logprobs_ranges")
        return Call(session_id, offset, append, max_tokens, ranges, [], 0, [])

    def _owner_cancelled(self, session_id: str) -> bool:
        engine = self.server.engine
        with engine._lock:
            owner = engine.sessions[session_id].owner
            return owner is not None and owner.is_cancelled

    def _held(self, session_id: str) -> list[int]:
        """The session's committed tokens, as the server holds them."""
        engine = self.server.engine
        with engine._lock:
            return list(engine.sessions[session_id].token_ids)

    def _check_committed(
        self, before: SessionModel, call: Call, events: list[pb.Token], held: list[int]
    ) -> None:
        """What a call ended early left: nothing, or its append then greedy tokens, the
        ones its stream delivered first; each event it delivered is right."""
        assert held[: call.offset] == before.token_ids[: call.offset]
        prompt = before.token_ids[: call.offset] + call.append
        decoded = [e.position for e in events if not e.is_prefill]
        if held != before.token_ids:  # taken: all it decoded is greedy
            assert held[: len(prompt)] == prompt, "the append was not committed whole"
            decoded = list(range(len(prompt), len(held)))
        assert set(e.position for e in events if not e.is_prefill) <= set(decoded)
        if not decoded and not events:  # never taken, a rewind, an append not prefilled
            return
        after = SessionModel(held, [(s, seed) for s, seed in before.images if s < call.offset])
        logprobs, _ = self.oracle.forward(after)
        for position in decoded:
            assert held[position] == int(logprobs[position - 1].argmax()), "not greedy"
        for event in events:
            assert event.id == held[event.position]
            if event.sampled_logprob:  # scored (image placeholders and position 0 are not)
                want = logprobs[event.position - 1, event.id].item()
                assert abs(event.sampled_logprob - want) < TOLERANCE
