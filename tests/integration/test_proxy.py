"""HAProxy running the shipped config (deploy/haproxy/haproxy.cfg) in front of two fake
replicas (tests/fake_replica.py): the health check takes a NOT_SERVING replica out and
back, sessions stick by x-session-id, and a session that a lost replica sent elsewhere
stays there when the replica returns. The same with real models: test_replicas.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from salience_client import Failover, SalienceClient, SalienceClientError
from salience_client.pb import salience_pb2 as pb
from salience_server.cluster import Proxy
from tests.fake_replica import RunningFake, start_fake

FAST = Failover(retry_budget_s=5.0, first_retry_wait_s=0.05)


@dataclass
class Named:
    """What the proxy needs to know of a replica."""

    name: str
    target: str


@dataclass
class Proxied:
    proxy: Proxy
    fakes: list[RunningFake]


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Proxied]:
    fakes = [start_fake(f"fake{index}") for index in range(2)]
    named = [Named(f"fake{index}", fake.target) for index, fake in enumerate(fakes)]
    proxy = Proxy(named, tmp_path, check_interval="100ms")  # type: ignore[arg-type]
    running = Proxied(proxy, fakes)
    try:
        proxy.start()
        proxy.wait_states({"fake0": "UP", "fake1": "UP"}, 10)
        yield running
    finally:
        proxy.stop()
        for fake in running.fakes:
            fake.stop()


def test_a_replica_not_serving_gets_no_calls_until_it_serves_again(proxied: Proxied) -> None:
    proxy, fakes = proxied.proxy, proxied.fakes
    fakes[1].set_serving(False)
    proxy.wait_states({"fake0": "UP", "fake1": "DOWN"}, 10)
    with SalienceClient(proxy.target, timeout=10, replay=FAST) as client:
        # Fixed ids: new sessions go where their id hashes (these spread over both).
        sessions = [client.open_session(session_id=f"first-{i}") for i in range(8)]
        assert {session.replica for session in sessions} == {"fake0"}
        fakes[1].set_serving(True)
        proxy.wait_states({"fake0": "UP", "fake1": "UP"}, 10)
        later = [client.open_session(session_id=f"later-{i}") for i in range(8)]
        assert {session.replica for session in later} == {"fake0", "fake1"}


def test_sessions_stick_and_a_moved_session_stays_moved(proxied: Proxied) -> None:
    proxy, fakes = proxied.proxy, proxied.fakes
    with SalienceClient(proxy.target, timeout=10, replay=FAST) as client:
        sessions = [client.open_session(session_id=f"sticky-{i}") for i in range(8)]
        for turn in range(3):
            for session in sessions:
                session.prefill([turn])
        homes = [session.replica for session in sessions]
        assert set(homes) == {"fake0", "fake1"}
        for index, fake in enumerate(fakes):
            name = f"fake{index}"
            held = {s.session_id for s, home in zip(sessions, homes, strict=True) if home == name}
            assert set(fake.replica.sessions) == held  # each session on its replica only
        assert proxy.sticky_replicas() == {
            s.session_id: home for s, home in zip(sessions, homes, strict=True)
        }
        port = fakes[1].port
        fakes[1].stop()  # the replica is gone, with its sessions
        for session in sessions:
            session.prefill([7])
        assert {session.replica for session in sessions} == {"fake0"}
        moved = [s for s, home in zip(sessions, homes, strict=True) if home == "fake1"]
        assert [s.num_replays for s in moved] == [1] * len(moved)
        assert all(fakes[0].replica.sessions[s.session_id] == [0, 1, 2, 7] for s in sessions)
        fakes[1] = start_fake("fake1", port)  # it comes back, empty
        proxy.wait_states({"fake0": "UP", "fake1": "UP"}, 10)
        for session in sessions:
            session.prefill([8])
        assert {session.replica for session in sessions} == {"fake0"}
        assert client.failover_stats.num_replays == len(moved)  # no second replay
        assert fakes[1].replica.sessions == {}


def test_with_no_replica_in_service_the_error_says_so(proxied: Proxied) -> None:
    """With every replica down, the proxy answers as a gRPC server would, UNAVAILABLE
    and saying why (HAProxy's own HTML 503 reached the client as "Received http2 header
    with status: 503", or as "Stream removed" with code UNKNOWN); the client adds that
    its retries outlasted the budget."""
    proxy, fakes = proxied.proxy, proxied.fakes
    budget = Failover(retry_budget_s=0.5, first_retry_wait_s=0.05)
    with SalienceClient(proxy.target, timeout=10, replay=budget) as client:
        session = client.open_session()
        for fake in fakes:
            fake.set_serving(False)
        proxy.wait_states({"fake0": "DOWN", "fake1": "DOWN"}, 10)
        with pytest.raises(SalienceClientError) as raised:
            session.prefill([1])
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert raised.value.message == (
            "no replica in service behind the proxy (still so after retrying for 0.5 s)"
        )


def test_calls_in_flight_together_for_one_key_go_to_one_replica(proxied: Proxied) -> None:
    """A fork family's members share their root's key and may call at once. HAProxy
    writes a stick entry only once a replica answers, so calls in flight together for a
    key not yet in the table (a new family, or one whose replica was just lost) were each
    placed by ``leastconn``: on different replicas, where the family was then replayed
    twice and left copies behind. The key's hash now places them all on one."""
    proxy, fakes = proxied.proxy, proxied.fakes
    for fake in fakes:
        fake.replica.faults.get_session_delay_s = 0.3
    with SalienceClient(proxy.target, timeout=10, replay=FAST) as client:
        for family in ("family-a", "family-b", "family-c"):
            threads = [
                threading.Thread(target=_call_ignoring_errors, args=(client, family))
                for _ in range(3)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=10)
            placed = [fake.replica.calls.count(("GetSession", family)) for fake in fakes]
            assert sorted(placed) == [0, 3], (family, placed)


def _call_ignoring_errors(client: SalienceClient, key: str) -> None:
    """One GetSession through the proxy with ``key`` as its routing key (the session is
    unknown: NOT_FOUND, as the replica that got it answers)."""
    with contextlib.suppress(grpc.RpcError):
        client._stub.GetSession(
            pb.GetSessionRequest(session_id="member"), metadata=(("x-session-id", key),)
        )


def test_sequential_session_ids_spread_over_the_replicas(tmp_path: Path) -> None:
    """Client-chosen ids that differ only at their end hash to far apart points of the
    ring (``avalanche``); raw sdbm put them side by side: over three replicas, all on
    one."""
    fakes = [start_fake(f"fake{index}") for index in range(3)]
    named = [Named(f"fake{index}", fake.target) for index, fake in enumerate(fakes)]
    proxy = Proxy(named, tmp_path, check_interval="100ms")  # type: ignore[arg-type]
    try:
        proxy.start()
        proxy.wait_states({f"fake{index}": "UP" for index in range(3)}, 10)
        with SalienceClient(proxy.target, timeout=10, replay=FAST) as client:
            homes = [client.open_session(session_id=f"agent-{i:03d}").replica for i in range(30)]
        assert min(homes.count(f"fake{index}") for index in range(3)) >= 4, homes
    finally:
        proxy.stop()
        for fake in fakes:
            fake.stop()
