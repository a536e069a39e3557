"""A randomized, rule-based test of the Python clients against several real replicas
behind the real HAProxy (SPEC 2.7).

Three replica processes of the tiny Llama (``initializer_range`` 0.1, so that a wrong
position or a stale copy moves the logprobs) run behind HAProxy with
deploy/haproxy/haproxy.cfg. A seeded schedule opens sessions, appends, generates
(greedy and seeded sampling, with appends and rewinds, some long, some left early by
their caller, several sessions at once), scores ranges over old and new positions,
forks, rewinds and closes them, through the sync or the asyncio client, between faults:
a replica killed (SIGKILL, also in the middle of a stream), stopped (SIGTERM),
restarted, taken out of the proxy and put back, its proxied connections dropped, the
proxy's stick table cleared (calls then go back where their ids hash, where an old copy
may wait). At least one replica always serves, so every call must succeed.

The oracles, after every call: each session's ``history`` and ``length`` are the
model's tokens; every event's position, token and logprob equal one plain transformers
forward pass over them (1e-4), each owed position exactly once, in order; the tokens,
greedy or seeded, and the Done equal the same call on a control replica, a process that
is never faulted and is reached directly, where each session has a twin. A closed
session is on no running replica (but for an old copy left on one it moved away from
while that one lived: taken out of the proxy, or the proxy forgot where it was). A call
that does not end in time fails the test.

The schedule is plain seeded randomness rather than hypothesis: shrinking cannot replay
a schedule of live processes (which stream a kill meets is timing), and a short run
needs every step to do something. CI runs seed 1 (sync) and 2 (asyncio); by hand, for
many more steps:
  SALIENCE_REPLICA_FUZZ_SEEDS=1,2,3,4,5 SALIENCE_REPLICA_FUZZ_STEPS=60 \
      .venv/bin/pytest tests/integration/test_replica_fuzz.py --timeout=0
A failure names its seed and lists the steps it took.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from salience_client import Done, SalienceClient, TokenEvent
from salience_server.cluster import LocalCluster, Replica
from tests.helpers import reference_logprobs
from tests.replica_fuzz_support import CALL_TIMEOUT_S, Call, Driver, Tracked
from tests.tiny_models import reference_model

SERVER_ARGS = ["--block-size", "4", "--kv-cache-memory", "4MiB", "--log-level", "WARNING"]
MAX_LENGTH = 200
"""Positions a session may reach (the tiny Llama has 512)."""
STEPS = int(os.environ.get("SALIENCE_REPLICA_FUZZ_STEPS", "20"))
SEEDS = [int(seed) for seed in os.environ.get("SALIENCE_REPLICA_FUZZ_SEEDS", "").split(",") if seed]
"""The schedules each client runs (by default seed 1 for the sync client, 2 for asyncio)."""


class ReplicaFuzz:
    """One random schedule of calls and faults (``rng`` draws every choice), checked
    after each step; ``log`` holds the steps so far, for the message of a failure."""

    def __init__(
        self,
        cluster: LocalCluster,
        control: SalienceClient,
        reference: torch.nn.Module,
        is_async: bool,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self.control = control
        self.reference = reference
        self.rng = rng
        self.log: list[str] = []
        self.tracked: list[Tracked] = []
        self.out: set[str] = set()  # replicas taken out of the proxy (maint)
        for replica in cluster.replicas:
            cluster.proxy.admin(f"set server replicas/{replica.name} state ready")
            if not replica.is_running:
                cluster.restart(replica)
        cluster.wait_up()
        cluster.proxy.admin("clear table replicas")
        self.driver = Driver(cluster.target, is_async)

    def run(self, num_steps: int) -> None:
        steps: list[tuple[int, Callable[[], None]]] = [
            (24, self.generate),
            (8, self.together),
            (8, self.open),
            (6, self.fork),
            (8, self.rewind),
            (5, self.close),
            (4, self.stop_replica),
            (6, self.restart_replica),
            (3, self.take_out),
            (4, self.put_back),
            (3, self.drop_connections),
            (2, self.forget_placement),
        ]
        weights = [weight for weight, _ in steps]
        try:
            for _ in range(num_steps):
                ((_, step),) = self.rng.choices(steps, weights)
                step()
                for tracked in self.live():
                    self.check_history(tracked)
            for tracked in self.live():
                self.close_session(tracked)
        except BaseException as error:
            error.add_note("the steps:\n  " + "\n  ".join(self.log))
            raise
        finally:
            print("\n".join(self.log), file=__import__("sys").stderr)  # DEBUG
            self.driver.close()
            for tracked in self.tracked:
                tracked.twin.close()

    def note(self, line: str) -> None:
        self.log.append(line)

    # -- the oracle ------------------------------------------------------------------

    def check_events(self, tracked: Tracked, events: list[Any], owed: list[int]) -> None:
        """Every token event is the forward pass's, at the ``owed`` prefill positions and
        then at each decoded one, in order, once each (a prefix of them, for a call its
        caller left)."""
        tokens = tracked.tokens
        logprobs = reference_logprobs(self.reference, tokens) if len(tokens) > 1 else None
        token_events = [e for e in events if isinstance(e, TokenEvent)]
        positions = [e.position for e in token_events]
        decoded = [e.position for e in token_events if not e.is_prefill]
        assert positions == (owed + decoded)[: len(positions)], (positions, owed)
        for event in token_events:
            assert event.token_id == tokens[event.position]
            want = 0.0
            if event.position > 0 and logprobs is not None:
                want = logprobs[event.position - 1, event.token_id].item()
            assert abs(event.logprob - want) < 1e-4, (event, want)

    def check_history(self, tracked: Tracked) -> None:
        session = tracked.session
        assert session.length == len(tracked.tokens), session
        assert session.history.token_ids.tolist() == tracked.tokens, session
        if session.replica is not None:
            tracked.homes.add(session.replica)

    def live(self) -> list[Tracked]:
        return [tracked for tracked in self.tracked if not tracked.session.is_closed]

    def pick(self) -> Tracked | None:
        live = self.live()
        return self.rng.choice(live) if live else None

    def in_service(self) -> list[Replica]:
        return [r for r in self.cluster.replicas if r.is_running and r.name not in self.out]

    def may_lose(self, replica: Replica) -> bool:
        """Whether taking ``replica`` away leaves another serving."""
        return any(other is not replica for other in self.in_service())

    # -- sessions --------------------------------------------------------------------

    def open(self) -> None:
        if len(self.live()) >= 4:
            return
        session_id = uuid.uuid4().hex
        self.note(f"open {session_id}")
        session = self.driver.call(self.driver.client.open_session, session_id=session_id)
        self.tracked.append(Tracked(session, self.control.open_session()))

    def generate(self) -> None:
        tracked = self.pick()
        if tracked is None:
            return self.open()
        call = self.plan(tracked)
        if call is not None:
            self.make([call])

    def together(self) -> None:
        """Calls of several sessions at once, a fault maybe in the middle of one."""
        live = self.live()
        if len(live) < 2:
            return self.generate()
        chosen = self.rng.sample(live, self.rng.randint(2, min(3, len(live))))
        calls = [call for call in map(self.plan, chosen) if call is not None]
        if calls:
            self.make(calls)

    def plan(self, tracked: Tracked) -> Call | None:
        rng = self.rng
        truncate_to = rng.choice([None, None, rng.randint(0, len(tracked.tokens))])
        offset = len(tracked.tokens) if truncate_to is None else truncate_to
        tokens = [rng.randrange(256) for _ in range(rng.randint(0, 12))]
        max_tokens = rng.choice([0, rng.randint(1, 10), rng.randint(1, 10), rng.randint(20, 60)])
        if offset + len(tokens) + max_tokens > MAX_LENGTH:
            self.rewind()
            return None
        if offset + len(tokens) == 0:
            tokens = [rng.randrange(256)]
        options: dict[str, Any] = {"max_tokens": max_tokens, "truncate_to": truncate_to}
        if rng.random() < 0.5:
            options |= {"temperature": 1.0, "top_k": 40, "seed": rng.randrange(2**31)}
        if rng.random() < 0.3:
            options["ignore_eos"] = True
        first_scored = rng.randint(0, offset + len(tokens))
        if first_scored < offset + len(tokens):
            options["logprobs_ranges"] = [(first_scored, 2**32 - 1)]
        call = Call(tracked, tokens, options, first_scored)
        if max_tokens > 1 and rng.random() < 0.3:
            call.midway = self.fault_midway(tracked, rng.random() < 0.5)
        if max_tokens > 1 and rng.random() < 0.2:
            call.leave_after = rng.randint(1, 4)
        return call

    def make(self, calls: list[Call]) -> None:
        for call in calls:
            self.note(
                f"generate {call.tracked.session.session_id} +{len(call.tokens)} {call.options}"
                + (" (a fault midway)" if call.midway else "")
                + (f" (left after {call.leave_after} events)" if call.leave_after else "")
            )
        if len(calls) > 1:
            self.note("  (together)")
        offsets = [call.offset for call in calls]
        got = self.driver.events(calls)
        for call, offset, events in zip(calls, offsets, got, strict=True):
            self.verify(call, offset, events)

    def verify(self, call: Call, offset: int, events: list[TokenEvent | Done]) -> None:
        """The events equal the twin's (a prefix of them, for a call left early) and the
        forward pass over the session's tokens."""
        tracked = call.tracked
        control = list(tracked.twin.generate(call.tokens, **call.options))
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [
            e.token_id for e in control[:-1]
        ][: len(events)]
        decoded = [e.token_id for e in events if isinstance(e, TokenEvent) and not e.is_prefill]
        tracked.tokens[offset:] = call.tokens + decoded
        owed = list(range(call.first_scored, offset + len(call.tokens)))
        if isinstance(events[-1], Done):
            want_done, done = control[-1], events[-1]
            assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (
                want_done.prompt_tokens,
                want_done.completion_tokens,
                want_done.finish_reason,
            )
            assert done.total_tokens == len(tracked.tokens)
        else:  # left early: the twin is rewound to what the caller received
            assert len(events) == call.leave_after
            tracked.twin.rewind(len(tracked.tokens))
        self.check_events(tracked, events, owed)

    def fault_midway(self, tracked: Tracked, kills: bool) -> Callable[[], None]:
        """A fault on the replica serving ``tracked`` once its stream began: SIGKILL, or
        the proxy dropping its connections to it."""

        def fault() -> None:
            replica = self.cluster.replica(tracked.session.replica)
            if kills and self.may_lose(replica):
                self.note(f"  kill {replica.name} midway")
                replica.kill()
            else:
                self.note(f"  drop the connections to {replica.name} midway")
                self.cluster.proxy.admin(f"shutdown sessions server replicas/{replica.name}")

        return fault

    def rewind(self) -> None:
        tracked = self.pick()
        if tracked is None:
            return
        offset = self.rng.randint(0, len(tracked.tokens))
        self.note(f"rewind {tracked.session.session_id} to {offset}")
        done = self.driver.call(tracked.session.rewind, offset)
        tracked.twin.rewind(offset)
        del tracked.tokens[offset:]
        assert (done.total_tokens, done.finish_reason) == (offset, "prefill")

    def fork(self) -> None:
        tracked = self.pick()
        if tracked is None or len(self.live()) >= 4:
            return
        self.note(f"fork {tracked.session.session_id}")
        child = self.driver.call(tracked.session.fork)
        assert child.length == len(tracked.tokens)
        forked = Tracked(child, tracked.twin.fork(), list(tracked.tokens))
        forked.homes.add(tracked.session.replica)  # made where its parent answered
        self.tracked.append(forked)
        self.note(f"  forked {child.session_id}")

    def close(self) -> None:
        tracked = self.pick()
        if tracked is not None:
            self.close_session(tracked)

    def close_session(self, tracked: Tracked) -> None:
        session_id = tracked.session.session_id
        self.note(f"close {session_id}")
        self.driver.call(tracked.session.close)
        tracked.twin.close()
        for replica in self.cluster.replicas:
            # A replica it moved away from (taken out of the proxy, or the proxy forgot
            # where it lived) may keep an old copy that no call reaches: its TTL frees it.
            may_hold = replica.name in tracked.homes and replica.name != tracked.session.replica
            if replica.is_running and not may_hold:
                with SalienceClient(replica.target, timeout=10, replay=False) as direct:
                    held = [info.session_id for info in direct.list_sessions()]
                assert session_id not in held, f"{session_id} still open on {replica.name}"

    # -- faults ----------------------------------------------------------------------

    def stop_replica(self) -> None:
        replica = self.rng.choice(self.cluster.replicas)
        if replica.is_running and self.may_lose(replica):
            graceful = self.rng.random() < 0.5
            self.note(f"{'stop' if graceful else 'kill'} {replica.name}")
            replica.stop() if graceful else replica.kill()

    def restart_replica(self) -> None:
        down = [replica for replica in self.cluster.replicas if not replica.is_running]
        if down:
            replica = self.rng.choice(down)
            self.note(f"restart {replica.name}")
            if replica.name in self.out:  # (the proxy would not take it in)
                self.cluster.proxy.admin(f"set server replicas/{replica.name} state ready")
                self.out.discard(replica.name)
            self.cluster.restart(replica)

    def take_out(self) -> None:
        replica = self.rng.choice(self.cluster.replicas)
        if replica.name not in self.out and self.may_lose(replica):
            self.note(f"take {replica.name} out of the proxy")
            self.cluster.proxy.admin(f"set server replicas/{replica.name} state maint")
            self.out.add(replica.name)

    def put_back(self) -> None:
        if self.out:
            name = self.rng.choice(sorted(self.out))
            self.note(f"put {name} back into the proxy")
            self.cluster.proxy.admin(f"set server replicas/{name} state ready")
            self.out.discard(name)

    def drop_connections(self) -> None:
        name = self.rng.choice(self.cluster.replicas).name
        self.note(f"drop the connections to {name}")
        self.cluster.proxy.admin(f"shutdown sessions server replicas/{name}")

    def forget_placement(self) -> None:
        """The proxy forgets where sessions live: each call goes where its id hashes,
        to an old copy maybe."""
        self.note("clear the stick table")
        self.cluster.proxy.admin("clear table replicas")


@pytest.fixture(scope="module")
def cluster_and_control(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, str]]:
    """The replicas behind the proxy, and beside them a replica outside it that nothing
    faults (the unbroken run), its address; all four load at once."""
    server_args = ["--model", str(tiny_llama_dir), *SERVER_ARGS]
    control = Replica("control", server_args, tmp_path_factory.mktemp("control"))
    control.start()
    try:
        with LocalCluster(3, [*server_args, "--grace-s", "5"], check_interval="300ms") as cluster:
            control.wait_serving(300)
            yield cluster, control.target
    finally:
        control.stop()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_sessions_through_replica_faults_match_one_unbroken_run(
    is_async: bool, cluster_and_control: tuple[LocalCluster, str], tiny_llama_dir: Path
) -> None:
    cluster, control_target = cluster_and_control
    reference = reference_model(tiny_llama_dir)
    seeds = SEEDS or [2 if is_async else 1]
    with SalienceClient(control_target, timeout=CALL_TIMEOUT_S, replay=False) as control:
        for seed in seeds:
            fuzz = ReplicaFuzz(cluster, control, reference, is_async, random.Random(seed))
            try:
                fuzz.run(STEPS)
            except BaseException as error:
                error.add_note(
                    f"schedule seed {seed} (SALIENCE_REPLICA_FUZZ_SEEDS={seed} replays it)"
                )
                raise
