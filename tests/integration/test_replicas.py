"""Several replicas behind a real HTTP/2 proxy, end to end (SPEC 2.7).

Three replicas of the tiny Llama run as processes (so that one can be killed with
SIGKILL) behind HAProxy with deploy/haproxy/haproxy.cfg; clients connect to the proxy.
The oracle is a control run of the same turns on one server that never fails
(``llama_server``): greedy tokens equal, token for token. The replicas serve the tiny
Llama with more positions (``long_context_llama_dir``, the same weights: the same
tokens), so that a stream can outlast a kill. Where sessions live is read
from each replica directly (ListSessions), not only from what the client reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from salience_client import (
    AsyncSalienceClient,
    Failover,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from salience_client import Session as SyncSession
from salience_server.cluster import LocalCluster, free_port
from tests.conftest import RunningServer
from tests.helpers import random_tokens
from tests.shim_support import start_shim

REPO = Path(__file__).resolve().parents[2]
SERVER_ARGS = ["--block-size", "4", "--kv-cache-memory", "4MiB", "--log-level", "WARNING"]
NUM_SESSIONS = 6
"""Sessions of each test, with fixed ids: the proxy places a new session where its id
hashes, so these land on several replicas every run."""
TURN_TOKENS = 8
DECODE_TOKENS = 6
FAILOVER = Failover(retry_budget_s=15.0)


@pytest.fixture(scope="module")
def cluster(long_context_llama_dir: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        3, ["--model", str(long_context_llama_dir), *SERVER_ARGS], check_interval="500ms"
    ) as running:
        yield running


@pytest.fixture
def healthy(cluster: LocalCluster) -> LocalCluster:
    """The cluster with all three replicas up (a test before may have killed one)."""
    for replica in cluster.replicas:
        if not replica.is_running:
            cluster.restart(replica)
    cluster.wait_up()
    return cluster


def _turn_tokens(session_index: int, turn: int) -> list[int]:
    return random_tokens(TURN_TOKENS, 100 * session_index + turn)


def _turn(session: SyncSession, session_index: int, turn: int) -> list[int]:
    """One agent turn: append the user's tokens, decode greedily; the decoded ids."""
    events = session.generate(_turn_tokens(session_index, turn), max_tokens=DECODE_TOKENS)
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def _control(server: RunningServer, num_turns: int) -> list[list[list[int]]]:
    """[session][turn] decoded ids of the same turns on one server that never fails."""
    with SalienceClient(server.target, timeout=30) as client:
        sessions = [client.open_session(session_id=f"t1-{i}") for i in range(NUM_SESSIONS)]
        outputs = [[_turn(s, i, turn) for turn in range(num_turns)] for i, s in enumerate(sessions)]
        for session in sessions:
            session.close()
    return outputs


def _where(cluster: LocalCluster) -> dict[str, str]:
    """Session id -> the replica holding it, asked of every running replica."""
    held: dict[str, str] = {}
    for replica in cluster.replicas:
        if replica.is_running:
            with SalienceClient(replica.target, timeout=10) as direct:
                for info in direct.list_sessions():
                    assert info.session_id not in held, "a session on two replicas"
                    held[info.session_id] = replica.name
    return held


def test_sessions_stay_on_one_replica_each_and_use_several(
    healthy: LocalCluster, llama_server: RunningServer
) -> None:
    want = _control(llama_server, 3)
    with SalienceClient(healthy.target, timeout=30, replay=FAILOVER) as client:
        sessions = [client.open_session(session_id=f"t2-{i}") for i in range(NUM_SESSIONS)]
        got: list[list[list[int]]] = [[] for _ in sessions]
        replicas: list[set[str | None]] = [set() for _ in sessions]
        for turn in range(3):
            for index, session in enumerate(sessions):
                got[index].append(_turn(session, index, turn))
                replicas[index].add(session.replica)
        assert got == want
        assert all(len(seen) == 1 for seen in replicas), replicas
        homes = {session.session_id: session.replica for session in sessions}
        assert len(set(homes.values())) >= 2
        held = _where(healthy)
        assert {sid: held[sid] for sid in homes} == homes
        sticky = healthy.proxy.sticky_replicas()
        assert {sid: sticky[sid] for sid in homes} == homes
        assert client.failover_stats.num_replays == 0
        for session in sessions:
            session.close()


def test_two_chat_turns_through_the_shim_land_on_one_replica(
    healthy: LocalCluster, llama_server: RunningServer
) -> None:
    """The shim in front of the proxy reuses its session's KV as the shim in front of one
    server does: the same replies and the same cached_tokens."""
    shims = [start_shim(healthy.target), start_shim(llama_server.target)]
    try:
        results = []
        for shim in shims:
            openai = shim.client()
            messages = [{"role": "user", "content": "Tell me about replicas."}]
            usages, replies = [], []
            for follow_up in ("And then?", None):
                reply = openai.chat.completions.create(
                    model=openai.models.list().data[0].id,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=8,
                    temperature=0,
                )
                replies.append(reply.choices[0].message.content)
                usages.append(reply.usage)
                messages += [{"role": "assistant", "content": replies[-1]}]
                if follow_up:
                    messages += [{"role": "user", "content": follow_up}]
            results.append((replies, [u.prompt_tokens_details.cached_tokens for u in usages]))
            if shim is shims[0]:
                pool = shim.backend.pool
                assert pool.num_sessions == 1
                session = pool._entries[0].session
                assert _where(healthy)[session.session_id] == session.replica
                assert session.num_replays == 0
        (replies, cached), control = results
        assert (replies, cached) == control
        assert cached[0] == 0 and cached[1] > 0
    finally:
        for shim in shims:
            shim.stop()


def test_a_killed_replica_s_sessions_replay_elsewhere_and_stay_when_it_returns(
    healthy: LocalCluster, llama_server: RunningServer
) -> None:
    want = _control(llama_server, 4)
    with SalienceClient(healthy.target, timeout=30, replay=FAILOVER) as client:
        sessions = [client.open_session(session_id=f"t3-{i}") for i in range(NUM_SESSIONS)]
        got = [[_turn(s, i, turn) for turn in range(2)] for i, s in enumerate(sessions)]
        homes = [session.replica for session in sessions]
        victim = healthy.replica(max(set(homes), key=homes.count))
        victim.kill()
        for index, session in enumerate(sessions):
            got[index].append(_turn(session, index, 2))
        moved = [home == victim.name for home in homes]
        assert [s.num_replays for s in sessions] == [int(m) for m in moved]
        assert all(s.replica != victim.name for s in sessions)
        assert [s.replica == home for s, home in zip(sessions, homes, strict=True)] == [
            not m for m in moved
        ]
        after_kill = [session.replica for session in sessions]
        healthy.restart(victim)  # back, empty, and UP in the proxy
        for index, session in enumerate(sessions):
            got[index].append(_turn(session, index, 3))
        assert got == want
        assert [session.replica for session in sessions] == after_kill
        assert client.failover_stats.num_replays == sum(moved)  # no second replay
        held = _where(healthy)
        assert [held[s.session_id] for s in sessions] == after_kill
        for session in sessions:
            session.close()


def test_a_replica_killed_mid_stream_the_stream_completes_as_the_control(
    healthy: LocalCluster, long_context_llama_dir: Path, server_factory: Any
) -> None:
    """Killed once 20 tokens came, the replica has 1,980 steps left, seconds of work: the
    kill cuts the stream (a stream of 300 tokens, near all the tiny Llama's positions
    allow, was done a third of a second after, a race with the client's kill on a loaded
    machine). The control runs on the same long-context model."""
    prompt = random_tokens(12, 7)
    options: dict[str, Any] = {"max_tokens": 2000, "ignore_eos": True}
    control_server = server_factory(long_context_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    with SalienceClient(control_server.target, timeout=30) as control:
        with control.open_session() as session:
            want = [
                e.token_id for e in session.generate(prompt, **options) if isinstance(e, TokenEvent)
            ]

    async def through_the_proxy() -> tuple[list[int], Any]:
        async with AsyncSalienceClient(healthy.target, timeout=30, replay=FAILOVER) as client:
            session = await client.open_session()
            decoded: list[int] = []
            async with contextlib.aclosing(session.generate(prompt, **options)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        decoded.append(event.token_id)
                        if len(decoded) == 20:
                            first = session.replica
                            healthy.replica(first).kill()
                    else:
                        done = event
            assert session.replica != first
            assert (session.num_resumes, session.num_replays) == (1, 1)
            await session.close()
            return decoded, done

    decoded, done = asyncio.run(through_the_proxy())
    assert decoded == want
    assert (done.prompt_tokens, done.completion_tokens) == (len(prompt), 2000)
    assert done.total_tokens == len(prompt) + 2000 and done.finish_reason == "length"


@pytest.mark.parametrize("count", ["abc", "0"])
def test_cluster_sh_checks_its_count_before_setting_up(count: str, tmp_path: Path) -> None:
    """A bad count is a usage line before ``scripts/setup.sh`` runs (a typo on a fresh
    checkout cost a whole install): a copy of the script with a set-up that fails proves
    it never ran."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "cluster.sh").write_text((REPO / "scripts" / "cluster.sh").read_text())
    (scripts / "setup.sh").write_text("#!/usr/bin/env bash\necho SET-UP RAN; exit 7\n")
    (scripts / "setup.sh").chmod(0o755)
    ran = subprocess.run(
        ["bash", str(scripts / "cluster.sh"), count], capture_output=True, text=True
    )
    assert ran.returncode == 2 and ran.stderr.startswith("usage: scripts/cluster.sh N")
    assert "SET-UP RAN" not in ran.stdout


def test_cluster_sh_starts_replicas_behind_the_proxy_and_stops_them(tiny_llama_dir: Path) -> None:
    port = free_port()
    command = [str(REPO / "scripts" / "cluster.sh"), "1", "--port", str(port)]
    command += ["--", "--model", str(tiny_llama_dir), *SERVER_ARGS]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while not any(line.startswith("proxy: ") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        replica_target = re.search(r"replica0: (\S+)", "".join(lines))
        assert replica_target and f"proxy: 127.0.0.1:{port}" in "".join(lines)
        with SalienceClient(f"127.0.0.1:{port}", timeout=30) as client:
            with client.open_session() as session:
                session.prefill([1, 2, 3])
                assert session.replica == "replica0"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with SalienceClient(replica_target.group(1), timeout=2, replay=False) as direct:
            with pytest.raises(SalienceClientError) as caught:  # the replica is gone too
                direct.model_info()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:  # failed: stop it and what it started
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own process group
                process.wait(timeout=30)
