"""The failover's plain logic: which failures are breaks, the recovery budget, and the call
that resumes a broken stream."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from salience_client import failover
from salience_client.failover import (
    Attempts,
    Failover,
    is_broken,
    is_refusal,
    is_session_lost,
)
from salience_client.pb import salience_pb2 as pb
from salience_client.stream_progress import StreamProgress
from salience_client.types import Done, SalienceClientError, TokenEvent

EOS = 99


def _error(code: grpc.StatusCode, reason: str = "") -> SalienceClientError:
    return SalienceClientError(code, reason or code.name, "message")


def _request(**options: object) -> pb.GenerateRequest:
    request = pb.GenerateRequest(session_id="s", append_tokens=[5, 6, 7], offset=10, **options)  # type: ignore[arg-type]
    return request


def _token(position: int, token_id: int, is_prefill: bool = False) -> TokenEvent:
    return TokenEvent(position, token_id, is_prefill, logprob=-1.0, rank=1)


def test_breaks_are_told_from_answers() -> None:
    assert is_broken(_error(grpc.StatusCode.UNAVAILABLE))
    assert is_broken(_error(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"))
    assert is_broken(_error(grpc.StatusCode.CANCELLED))  # a stream reset by a proxy
    assert not is_broken(_error(grpc.StatusCode.CANCELLED, "SESSION_CLOSED"))
    assert not is_broken(_error(grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"))
    assert is_session_lost(_error(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"))
    assert not is_session_lost(_error(grpc.StatusCode.NOT_FOUND))
    assert is_refusal(_error(grpc.StatusCode.ABORTED, "OFFSET_MISMATCH"))
    assert not is_refusal(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV_CACHE_FULL"))


class _Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_replays_are_counted_and_retries_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock of the test's (the budget is wall time: a real clock that moved 0.1 s
    between the first and third retry, on a loaded machine, spent it)."""
    clock = _Clock()
    monkeypatch.setattr(failover, "time", clock)
    attempts = Attempts(Failover(max_replays=2, retry_budget_s=0.3, first_retry_wait_s=0.1))
    lost = _error(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    attempts.begin_replay("s", lost)
    attempts.begin_replay("s", lost)
    with pytest.raises(SalienceClientError) as caught:
        attempts.begin_replay("s", lost)
    assert caught.value.reason == "REPLAY_FAILED" and "failed 2 times" in caught.value.message
    down = _error(grpc.StatusCode.UNAVAILABLE)

    def waits(attempts: Attempts) -> list[float]:
        """The waits until the budget is spent, each slept on the test's clock."""
        budget_s = attempts.policy.retry_budget_s
        taken = []
        while True:
            try:
                taken.append(round(attempts.retry_wait_s(down), 6))
            except SalienceClientError as error:
                assert error.__cause__ is down and error.code == down.code
                assert error.message.endswith(f"(still so after retrying for {budget_s:g} s)")
                return taken
            clock.now += taken[-1]

    # Doubling waits; the last is cut to end at the budget's end, where the retries
    # stop (they stopped as soon as a doubled wait would pass it: 0.05 s early here).
    assert waits(attempts) == [0.0, 0.1, 0.2]
    budget = Attempts(Failover(retry_budget_s=0.35, first_retry_wait_s=0.1))
    assert waits(budget) == [0.0, 0.1, 0.2, 0.05]
    with pytest.raises(SalienceClientError) as caught:  # no budget: no retry, not one at once
        Attempts(Failover(retry_budget_s=0.0)).retry_wait_s(down)
    assert caught.value is down
    # The time the calls themselves take counts: 0.25 s after the first try, 0.05 s left.
    attempts = Attempts(Failover(retry_budget_s=0.3, first_retry_wait_s=0.1))
    assert attempts.retry_wait_s(down) == 0.0
    clock.now += 0.15
    assert attempts.retry_wait_s(down) == 0.1
    clock.now += 0.1
    assert round(attempts.retry_wait_s(down), 6) == 0.05
    clock.now += 0.05
    with pytest.raises(SalienceClientError) as caught:
        attempts.retry_wait_s(down)
    assert caught.value.__cause__ is down


def test_a_calls_replays_share_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each try of a replay had a whole timeout of its own: two tries, a failed one
    then one that went through, took twice the call's timeout and succeeded."""
    clock = _Clock()
    monkeypatch.setattr(failover, "time", clock)
    attempts = Attempts(Failover(), timeout_s=0.5)
    first = attempts.replay_deadline()
    clock.now += 0.4  # the first try failed after 0.4 s
    assert attempts.replay_deadline() == first == 0.5 + clock.now - 0.4
    attempts.replay_done()  # a later replay of the call (its stream broke again)
    clock.now += 10.0
    assert attempts.replay_deadline() == clock.now + 0.5
    assert Attempts(Failover()).replay_deadline() is None


def test_before_anything_streamed_the_call_is_made_again_truncating() -> None:
    progress = StreamProgress(_request(max_tokens=4))
    request, finish_reason = progress.next_request([EOS])
    assert request.truncating and request.offset == 10 and list(request.append_tokens) == [5, 6, 7]
    assert finish_reason == "" and progress.replay_length == 10


def test_after_decoded_tokens_only_the_rest_is_asked_for() -> None:
    ranges = [pb.PositionRange(start=11, end=2**32 - 1), pb.PositionRange(start=10, end=14)]
    progress = StreamProgress(_request(max_tokens=6, min_tokens=4, logprobs_ranges=ranges))
    for event in (_token(11, 6, True), _token(12, 7, True), _token(13, 50), _token(14, 51)):
        assert progress.observe(event)
    assert progress.replay_length == 15 and progress.committed_ids() == [5, 6, 7, 50, 51]
    request, finish_reason = progress.next_request([EOS])
    assert (request.offset, list(request.append_tokens), request.truncating) == (15, [], True)
    # min_tokens stays the call's: the server counts it from decode_start, the prompt's end.
    assert (request.max_tokens, request.min_tokens, finish_reason) == (4, 4, "")
    assert request.decode_start == 13
    assert [(r.start, r.end) for r in request.logprobs_ranges] == [(15, 2**32 - 1)]
    assert not progress.observe(_token(13, 50))  # delivered before
    assert progress.observe(_token(15, 52))
    done = Done(prompt_tokens=15, completion_tokens=1, total_tokens=16, finish_reason="length")
    merged = progress.merged_done(done, finish_reason)
    assert (merged.prompt_tokens, merged.completion_tokens, merged.total_tokens) == (13, 3, 16)


@pytest.mark.parametrize(
    ("ranges", "is_replayed", "cached", "recomputed"),
    [
        ([], False, 10, 0),
        ([], True, 0, 10),
        ([(4, 2**32 - 1)], False, 3, 0),  # fed again from position 3
        ([(4, 2**32 - 1)], True, 0, 3),
        ([(10, 11)], False, 9, 0),  # scores the first appended token: 9 feeds it
        ([(12, 2**32 - 1)], False, 10, 0),  # starts inside the append: nothing fed again
    ],
)
def test_a_resumed_call_counts_cached_what_the_unbroken_call_would_have(
    ranges: list[tuple[int, int]], is_replayed: bool, cached: int, recomputed: int
) -> None:
    """The resuming call finds its whole prompt in the KV (and, after a replay, the
    count of what the replay put in came from it): the caller's Done counts what the
    call it made found, the positions before its offset less those a range fed again,
    as the server counts them (test_resume_counts.py). It counted the whole prompt."""
    scored = [pb.PositionRange(start=start, end=end) for start, end in ranges]
    progress = StreamProgress(_request(max_tokens=6, logprobs_ranges=scored))
    progress.is_replayed = is_replayed
    assert progress.observe(_token(13, 50))
    progress.next_request([EOS])
    done = Done(prompt_tokens=14, completion_tokens=5, total_tokens=19, finish_reason="length")
    merged = progress.merged_done(dataclasses.replace(done, cached_tokens=13), "")
    assert (merged.prompt_tokens, merged.completion_tokens) == (13, 1)
    assert (merged.cached_tokens, merged.recomputed_tokens) == (cached, recomputed)


@pytest.mark.parametrize(
    ("options", "last", "want"),
    [
        ({"max_tokens": 2}, 51, "length"),
        ({"max_tokens": 9}, EOS, "stop"),
        ({"max_tokens": 9, "ignore_eos": True}, EOS, ""),
        ({"max_tokens": 9, "min_tokens": 5}, EOS, ""),
        ({"max_tokens": 9, "stop_token_ids": [51]}, 51, "stop"),
    ],
)
def test_a_call_whose_last_token_came_is_settled_not_continued(
    options: dict[str, object], last: int, want: str
) -> None:
    progress = StreamProgress(_request(**options))
    progress.observe(_token(13, 50))
    progress.observe(_token(14, last))
    request, finish_reason = progress.next_request([EOS])
    assert finish_reason == want
    assert request.max_tokens == (0 if want else 9 - 2)


def test_a_constrained_call_resumes_with_its_constraint_from_its_decode_start() -> None:
    """The server's grammar reads the tokens since ``decode_start`` again."""
    constraint = pb.Constraint(json_object=True)
    progress = StreamProgress(_request(max_tokens=5, constraint=constraint))
    progress.observe(_token(13, 50))
    request, finish_reason = progress.next_request([EOS])
    assert finish_reason == "" and request.constraint == constraint
    assert request.decode_start == progress.base_length and request.offset == 14
