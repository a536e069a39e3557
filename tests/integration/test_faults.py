"""Faults from outside (SPEC 2.4, 2.6): clients that cancel or die mid-stream, a server
that is stopped or killed, overload, and many short sessions. Loopback, bounded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from tests.conftest import start_server
from tests.helpers import (
    engine_held_in_a_step,
    error_reason,
    free_port,
    generate,
    open_session,
    random_tokens,
    server_command,
)

BLOCK_SIZE = 4
ROOT = Path(__file__).resolve().parents[2]

_CLIENT = textwrap.dedent(
    """
    import sys, grpc
    from salience_client.pb import salience_pb2 as pb, salience_pb2_grpc
    stub = salience_pb2_grpc.SalienceStub(grpc.insecure_channel(sys.argv[1]))
    streams = [
        stub.Generate(pb.GenerateRequest(
            session_id=s, append_tokens=[1, 2, 3], max_tokens=4000, ignore_eos=True))
        for s in sys.argv[2:]
    ]
    for stream in streams:
        next(stream)
    print("running", flush=True)
    while True:
        for stream in streams:
            next(stream)
    """
)


def _start_client_process(target: str, session_ids: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, target, *session_ids],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "running"
    return process


def test_fifty_cancelled_streams_leave_nothing_behind(
    long_context_llama_dir, server_factory
) -> None:
    """25 streams cancelled by the client, 25 whose client process is killed, at random
    moments, while 10 control streams run: within 2 s nothing runs any more, every
    block comes back once the sessions close, and the controls get their solo tokens.
    The streams would run 4,000 tokens (400 could end before their cancel or kill)."""
    server = server_factory(long_context_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=16 << 20)
    stub, engine = server.stub, server.engine
    rng = random.Random(7)
    controls = [random_tokens(6 + i, seed=100 + i) for i in range(10)]
    solo = [
        [t.id for t in generate(stub, open_session(stub), append_tokens=p, max_tokens=60)[0]]
        for p in controls
    ]
    control_results: list[list[int]] = [[] for _ in controls]

    def control(index: int) -> None:
        tokens, _ = generate(stub, open_session(stub), append_tokens=controls[index], max_tokens=60)
        control_results[index] = [t.id for t in tokens]

    def cancelled(session_id: str, delay_s: float) -> None:
        call = stub.Generate(
            pb.GenerateRequest(
                session_id=session_id, append_tokens=[4, 5], max_tokens=4000, ignore_eos=True
            )
        )
        next(call)
        time.sleep(delay_s)
        call.cancel()

    sessions = [open_session(stub) for _ in range(50)]
    threads = [threading.Thread(target=control, args=(i,)) for i in range(10)]
    threads += [
        threading.Thread(target=cancelled, args=(s, rng.uniform(0, 0.5))) for s in sessions[:25]
    ]
    for thread in threads:
        thread.start()
    processes = [
        _start_client_process(server.target, sessions[25 + 5 * i : 30 + 5 * i]) for i in range(5)
    ]
    for process in processes:
        time.sleep(rng.uniform(0, 0.1))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=60)
    gone = time.monotonic()
    while time.monotonic() - gone < 2.0:
        with engine._lock:
            if not engine.scheduler.has_work():
                break
        time.sleep(0.02)
    with engine._lock:
        assert not engine.scheduler.has_work(), "cancelled work is still running after 2 s"
        assert not any(s.is_busy for s in engine.sessions.values())
    print(f"50 cancelled streams: idle {time.monotonic() - gone:.3f} s after the last")
    assert control_results == solo
    for session_id in list(engine.sessions):
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_overload_past_the_queue_is_refused_within_100_ms(
    tiny_llama_dir, server_factory, caplog
) -> None:
    """One runs, two wait: a fourth call is refused QUEUE_FULL within 100 ms. The engine
    is held inside the running call's step throughout, so the queue stays full (the
    running call ended at the context's end in half a second, letting a waiting one in
    and the fourth wait in the queue), and refusing never waits on a step. The refusal
    reaches the server's log (only the metrics counted it)."""
    server = server_factory(
        tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, max_running=1, max_queue=2
    )
    stub, scheduler = server.stub, server.engine.scheduler
    streams = []
    try:
        with engine_held_in_a_step(server.engine) as in_step:
            for _ in range(3):  # one runs, two wait: the queue is full
                streams.append(
                    stub.Generate(
                        pb.GenerateRequest(
                            session_id=open_session(stub),
                            append_tokens=[1],
                            max_tokens=300,
                            ignore_eos=True,
                        )
                    )
                )
            assert in_step.wait(10), "no call ran"
            deadline = time.monotonic() + 10
            while len(scheduler.running) != 1 or len(scheduler.waiting) != 2:
                assert time.monotonic() < deadline, (
                    f"{len(scheduler.running)} running and {len(scheduler.waiting)} waiting "
                    "after 10 s, not 1 and 2"
                )
                time.sleep(0.001)
            session_id = open_session(stub)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught, caplog.at_level("WARNING", "salience.rpc"):
                generate(stub, session_id, append_tokens=[1], max_tokens=3)
            refused_s = time.monotonic() - start
    finally:
        for stream in streams:
            stream.cancel()
    print(f"overload: refused in {refused_s * 1e3:.1f} ms")
    assert refused_s < 0.1
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "QUEUE_FULL"
    assert any("refused a call, QUEUE_FULL" in r.getMessage() for r in caplog.records)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_two_thousand_session_cycles_return_to_zero(tiny_llama_dir, server_factory) -> None:
    """Open, generate, close 2,000 times: no session, block or image is left, and the
    process (server and client together) grows by less than 48 MiB after warm-up."""
    server = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    stub, engine = server.stub, server.engine

    def cycle(index: int) -> None:
        session_id = open_session(stub)
        generate(stub, session_id, append_tokens=[index % 250, 7, 9], max_tokens=1)
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))

    for index in range(200):
        cycle(index)
    before = _rss_bytes()
    for index in range(2000):
        cycle(index)
    growth = _rss_bytes() - before
    print(f"2,000 session cycles: RSS grew {growth / 2**20:.1f} MiB")
    assert len(engine.sessions) == 0 and len(engine.images) == 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert growth < 48 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"


def _start_server_process(model_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        server_command(
            "--model",
            str(model_dir),
            "--port",
            str(port),
            *args,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    target = f"127.0.0.1:{port}"
    grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=60)
    stub = salience_pb2_grpc.SalienceStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # listening comes before the model is loaded
        try:
            stub.GetModelInfo(pb.GetModelInfoRequest())
            break
        except grpc.RpcError:
            time.sleep(0.05)
    return process, target


def test_kill_9_mid_stream_ends_the_stream_unavailable(long_context_llama_dir) -> None:
    """The call would run for a minute or more, one token a step, so the kill comes
    mid-stream (on the tiny Llama's 512 positions it ended in half a second: a kill
    that came after it found nothing to cut)."""
    process, target = _start_server_process(long_context_llama_dir, "--max-batch-tokens", "1")
    try:
        stub = salience_pb2_grpc.SalienceStub(grpc.insecure_channel(target))
        stream = stub.Generate(
            pb.GenerateRequest(
                session_id=open_session(stub), append_tokens=[1], max_tokens=60000, ignore_eos=True
            ),
            timeout=30,
        )
        next(stream)
        start = time.monotonic()
        process.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        print(f"kill -9: the stream ended UNAVAILABLE after {time.monotonic() - start:.3f} s")
        assert time.monotonic() - start < 5
    finally:
        process.kill()
        process.wait(timeout=10)


_SILENT_CLIENT = textwrap.dedent(
    """
    import sys, grpc
    from salience_client.pb import salience_pb2 as pb, salience_pb2_grpc
    stub = salience_pb2_grpc.SalienceStub(grpc.insecure_channel(sys.argv[1]))
    stream = stub.Generate(pb.GenerateRequest(
        session_id=sys.argv[2], append_tokens=[1] * 400, max_tokens=20))
    print("sent", flush=True)
    for event in stream:
        pass
    """
)


def test_keepalive_finds_a_client_that_stopped_answering(tiny_llama_dir, monkeypatch) -> None:
    """A client frozen during a long prefill (SIGSTOP: its connection stays open, but it
    answers no ping) is found by the server's keepalive, and its call stops long
    before it would have ended."""
    server = start_server(
        str(tiny_llama_dir),
        server_options=dict(keepalive_s=1.0),
        block_size=4,
        max_batch_tokens=1,
    )
    process = None
    try:
        runner = server.engine.runner
        real = runner.execute

        def slow(batch, uploads=None):  # 20 ms a step, one token a step: the call would take 8 s
            time.sleep(0.02)
            return real(batch, uploads)

        monkeypatch.setattr(runner, "execute", slow)
        session_id = open_session(server.stub)
        process = subprocess.Popen(
            [sys.executable, "-c", _SILENT_CLIENT, server.target, session_id],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "sent"
        session = server.engine.sessions[session_id]
        while session.num_computed == 0:  # running
            time.sleep(0.01)
        process.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        while session.is_busy and time.monotonic() - frozen < 6:
            time.sleep(0.05)
        found_s = time.monotonic() - frozen
        print(f"keepalive: a frozen client's call stopped after {found_s:.2f} s")
        assert not session.is_busy and session.num_computed < 400
    finally:
        if process is not None:
            process.kill()
            process.wait(timeout=10)
        server.stop()
