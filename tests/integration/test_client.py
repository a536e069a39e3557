"""The Python client and the ``salience`` CLI against a real server in a subprocess.

Oracles: a plain transformers forward pass (score, decoded logprobs) and transformers
``generate(do_sample=False)`` (greedy decoding), on the tiny random Llama of conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import (
    END,
    AsyncSalienceClient,
    Done,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from salience_client.cli import ChatSession
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from tests.helpers import error_reason, reference_greedy, reference_logprobs
from tests.tiny_models import build_tokenizer, reference_model

TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[2]
PROMPT_TEXT = "Hello, world"
TOKENIZER = build_tokenizer()
PROMPT = TOKENIZER.encode(PROMPT_TEXT, add_special_tokens=False)  # one id per byte
UNREACHABLE = "127.0.0.1:1"


def _wait_for_port(process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> int:
    """The port the server logs once it listens (it was started with --port 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the server did not start:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server_target(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a real server process serving the tiny Llama, SERVING."""
    log_path = tmp_path_factory.mktemp("client-server") / "server.log"
    options = "--port 0 --block-size 4 --kv-cache-memory 8MiB".split()
    command = [sys.executable, "-m", "salience_server", "--model", str(tiny_llama_dir), *options]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        target = f"127.0.0.1:{_wait_for_port(process, log_path, 60)}"
        with SalienceClient(target) as client:
            client.wait_ready(timeout_s=60)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir: Path) -> Any:
    return reference_model(tiny_llama_dir)


@pytest.fixture
def client(server_target: str) -> Iterator[SalienceClient]:
    with SalienceClient(server_target, timeout=30) as client:
        yield client


def _split(events: list[TokenEvent | Done]) -> tuple[list[TokenEvent], Done]:
    *tokens, done = events
    assert isinstance(done, Done) and all(isinstance(t, TokenEvent) for t in tokens)
    return tokens, done  # type: ignore[return-value]


def _oracle_sum(logprobs: Any, token_ids: list[int], start: int, end: int) -> float:
    """Sum of log P(token_p | tokens_<p) for p in [start, end); position 0 counts 0."""
    return sum(
        float(logprobs[p - 1, token_ids[p]]) for p in range(max(start, 1), min(end, len(token_ids)))
    )


# ----- the sync client -------------------------------------------------------------


def test_model_info_and_tokenizer_round_trip(client: SalienceClient, tiny_llama_dir: Path) -> None:
    info = client.model_info()
    assert info.model_id == tiny_llama_dir.name and info.max_context == 512
    assert info.vocab_size == len(TOKENIZER) and info.chat_template
    assert info.eos_token_ids == [TOKENIZER.eos_token_id]
    assert client.tokenize(PROMPT_TEXT) == PROMPT
    assert client.detokenize(PROMPT) == PROMPT_TEXT
    chat_ids = client.tokenize_chat([{"role": "user", "content": "hi"}])
    assert client.detokenize(chat_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prefill_generate_and_rewind_track_the_length(client: SalienceClient) -> None:
    with client.open_session() as session:
        assert session.length == 0 and session.max_context == 512
        done = session.prefill(PROMPT)
        assert done.finish_reason == "prefill" and done.total_tokens == len(PROMPT)
        assert session.length == len(PROMPT)
        tokens, done = _split(list(session.generate(max_tokens=6, temperature=0.8, seed=3)))
        assert [t.position for t in tokens] == list(range(len(PROMPT), done.total_tokens))
        assert not any(t.is_prefill for t in tokens) and done.completion_tokens == len(tokens)
        assert session.length == done.total_tokens == session.info().length
        done = session.rewind(4)
        assert session.length == done.total_tokens == 4
        assert client.get_session(session.session_id).length == 4
        session_id = session.session_id
    assert session_id not in [s.session_id for s in client.list_sessions()]


def test_greedy_generate_equals_transformers(client: SalienceClient, oracle: Any) -> None:
    want = reference_greedy(oracle, PROMPT, 12)
    with client.open_session() as session:
        tokens, done = _split(list(session.generate(PROMPT, max_tokens=12)))
    got = [t.token_id for t in tokens]
    assert got == want
    assert done.finish_reason == ("stop" if len(got) < 12 else "length")
    logprobs = reference_logprobs(oracle, PROMPT + got)
    for token in tokens:
        want_logprob = float(logprobs[token.position - 1, token.token_id])
        assert token.logprob == pytest.approx(want_logprob, abs=TOLERANCE)


def test_score_equals_a_plain_forward_pass(client: SalienceClient, oracle: Any) -> None:
    rng = random.Random(11)
    token_ids = [rng.randrange(256) for _ in range(40)]
    logprobs = reference_logprobs(oracle, token_ids)
    with client.open_session() as session:
        first = session.score(token_ids[:10], [(0, 10), (0, 1), (3, 7)])
        ranges = [(10, 20), (15, 30), (10, END), (38, 39)]
        rest = session.score(token_ids[10:], ranges)
        assert session.length == 40
    assert first[1] == 0.0  # position 0 has no context
    for got, (start, end) in zip(first + rest, [(0, 10), (0, 1), (3, 7), *ranges], strict=True):
        assert got == pytest.approx(_oracle_sum(logprobs, token_ids, start, end), abs=TOLERANCE)


def test_fork_shares_the_prefix_and_diverges(client: SalienceClient, oracle: Any) -> None:
    continuation = [65, 66, 67, 68]
    with client.open_session() as parent:
        parent.prefill(PROMPT)
        with parent.fork() as child:
            assert child.session_id != parent.session_id and child.length == len(PROMPT)
            child_score = child.score(continuation, [(len(PROMPT), END)])
            assert child.length == len(PROMPT) + 4 and parent.info().length == len(PROMPT)
        parent_score = parent.score(continuation[::-1], [(len(PROMPT), END)])
    logprobs = reference_logprobs(oracle, PROMPT + continuation)
    assert child_score[0] == pytest.approx(
        _oracle_sum(logprobs, PROMPT + continuation, len(PROMPT), END), abs=TOLERANCE
    )
    assert parent_score[0] != pytest.approx(child_score[0], abs=TOLERANCE)


def test_errors_carry_code_reason_and_session_length(client: SalienceClient) -> None:
    with client.open_session() as session:
        session.prefill(PROMPT)
        session.length = 3  # a stale view: the server holds 12 tokens
        with pytest.raises(SalienceClientError) as caught:
            session.prefill([1])
        error = caught.value
        assert error.code == grpc.StatusCode.ABORTED and error.reason == "OFFSET_MISMATCH"
        assert error.session_length == len(PROMPT)
        assert session.length == len(PROMPT)  # re-synced after the failure
        assert session.prefill([1]).total_tokens == len(PROMPT) + 1
        with pytest.raises(TypeError, match="max_token"):
            session.generate(max_token=3)  # type: ignore[call-arg]
        # Values their fields cannot carry fail as the call is made, naming the field
        # (the protobuf encoder raised at the first next(), without it).
        bad_calls: list[tuple[dict[str, Any], str]] = [
            (dict(max_tokens=-1), "max_tokens"),
            (dict(seed=-3), "seed"),
            (dict(stop_token_ids=[2**32]), "stop_token_ids"),
            (dict(logprobs_ranges=[(-1, 5)]), "logprobs_ranges"),
            (dict(priority=2**31), "priority"),
            (dict(top_k=1.5), "top_k"),
        ]
        for options, name in bad_calls:
            with pytest.raises(ValueError, match=name):
                session.generate(**options)
        with pytest.raises(ValueError, match="append_tokens"):
            session.generate([5, -1])
        with pytest.raises(ValueError, match="truncate_to"):
            session.generate(truncate_to=-2)
        assert session.prefill(np.array([1, 2])).total_tokens == len(PROMPT) + 3  # numpy ids
    with pytest.raises(SalienceClientError) as caught:
        client.get_session("no-such-session")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "SESSION_NOT_FOUND"
    with SalienceClient(UNREACHABLE) as unreachable, pytest.raises(SalienceClientError) as caught:
        unreachable.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_abandoned_stream_is_cancelled_and_the_length_resynced(client: SalienceClient) -> None:
    """Leaving the stream cancels the call; the length is re-read at once, or, while the
    server still winds the call down, before the next call (which then fits)."""
    with client.open_session() as session:
        session.prefill(PROMPT * 10)
        for event in session.generate([1] * 200, max_tokens=200):
            assert isinstance(event, TokenEvent)
            break
        done = session.prefill([2])
        info = session.info()
        assert not info.is_busy and done.total_tokens == info.length == session.length


def test_a_cancelled_async_call_returns_at_once_and_the_next_call_fits(
    tiny_llama_dir: Path, server_factory: Any
) -> None:
    """asyncio cancellation (wait_for's timeout) ends the call at once: the client does not
    wait for the server to wind down the step it is in (it waited up to 5 s: a long
    prefill's step, 4 s on the default model here; one second of sleep here)."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)
    execute = server.engine.runner.execute

    def slow_execute(batch: Any) -> Any:
        time.sleep(1.0)
        return execute(batch)

    async def scenario() -> None:
        async with AsyncSalienceClient(server.target, timeout=30) as client:
            async with await client.open_session() as session:
                server.engine.runner.execute = slow_execute
                start = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(session.prefill([3] * 40), 0.1)
                assert time.monotonic() - start < 0.6
                server.engine.runner.execute = execute
                done = await session.prefill([4])
                info = await session.info()
                assert not info.is_busy and done.total_tokens == info.length == session.length

    asyncio.run(scenario())


# ----- the async client --------------------------------------------------------------


async def _async_scenario(target: str, oracle: Any) -> None:
    async with AsyncSalienceClient(target, timeout=30) as client:
        assert (await client.model_info()).vocab_size == len(TOKENIZER)
        prompt = await client.tokenize(PROMPT_TEXT)
        assert prompt == PROMPT
        async with await client.open_session() as session:
            assert (await session.prefill(prompt)).total_tokens == len(PROMPT)
            events = [event async for event in session.generate(max_tokens=8)]
            tokens, done = _split(events)
            assert [t.token_id for t in tokens] == reference_greedy(oracle, PROMPT, 8)
            assert session.length == done.total_tokens == (await session.info()).length
            child = await session.fork()
            [total] = await child.score([70, 71, 72], [(child.length, END)])
            assert total < 0.0 and child.length == session.length + 3
            await child.close()
            session.length += 1
            with pytest.raises(SalienceClientError) as caught:
                await session.prefill([5])
            assert caught.value.reason == "OFFSET_MISMATCH"
            assert caught.value.session_length == session.length == done.total_tokens
            async with contextlib.aclosing(session.generate([1] * 200, max_tokens=200)) as stream:
                async for _ in stream:
                    break
            await session.sync()
            info = await session.info()
            assert not info.is_busy and session.length == info.length
            listed = [s.session_id for s in await client.list_sessions()]
            assert session.session_id in listed and child.session_id not in listed
        with pytest.raises(SalienceClientError) as caught:
            await client.get_session(session.session_id)
        assert caught.value.reason == "SESSION_NOT_FOUND"


def test_async_client(server_target: str, oracle: Any) -> None:
    asyncio.run(_async_scenario(server_target, oracle))


# ----- the CLI -------------------------------------------------------------------------


def _salience(target: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "salience"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "salience_client.cli"]
    result = subprocess.run(
        [*command, "--target", target, *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    # Decoded by hand: text mode would turn a generated "\r" into "\n".
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def test_cli_info_and_sessions(
    server_target: str, client: SalienceClient, tiny_llama_dir: Path
) -> None:
    result = _salience(server_target, "info")
    assert result.returncode == 0, result.stderr
    assert f"model:            {tiny_llama_dir.name}" in result.stdout
    assert (
        f"vocab size:       {len(TOKENIZER)}" in result.stdout
        and "max context:      512" in result.stdout
    )
    with client.open_session() as session:
        session.prefill(PROMPT)
        result = _salience(server_target, "sessions")
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if session.session_id in line]
    assert row.split()[1:4] == [str(len(PROMPT)), "512", "resident"]


def test_cli_score_prints_each_token_and_the_total(server_target: str, oracle: Any) -> None:
    result = _salience(server_target, "score", PROMPT_TEXT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(PROMPT) + 1  # header, one line per token, total
    want = _oracle_sum(reference_logprobs(oracle, PROMPT), PROMPT, 0, END)
    match = re.fullmatch(rf"total logprob: (\S+) over {len(PROMPT) - 1} tokens .*", lines[-1])
    assert match and float(match.group(1)) == pytest.approx(want, abs=1e-3)
    by_tokens = _salience(server_target, "score", "--tokens", ",".join(map(str, PROMPT)))
    assert by_tokens.stdout == result.stdout
    # A character split over tokens (the tiny model's tokens are bytes) prints its bytes.
    split = _salience(server_target, "score", "é").stdout.splitlines()
    assert "'\\xc3'" in split[1] and "'\\xa9'" in split[2], split


def test_cli_chat_keeps_one_session_across_turns(
    server_target: str, client: SalienceClient
) -> None:
    options = {"max_tokens": 8, "temperature": 0.0}
    with client.open_session() as session:
        conversation = ChatSession(client, session, system="brief")
        sent: list[int] = []
        generate = session.generate

        def spy(append_tokens: Any = (), **kwargs: Any) -> Any:
            sent.append(len(append_tokens))
            return generate(append_tokens, **kwargs)

        session.generate = spy  # type: ignore[method-assign]
        replies = []
        for text in ("hi", "and then?"):
            out = io.StringIO()
            done = conversation.turn(text, out, **options)
            assert done.total_tokens == session.length == len(conversation.committed_ids)
            replies.append(out.getvalue())
        first_prompt = client.tokenize_chat(conversation.messages[:2])
        second_prompt = client.tokenize_chat(conversation.messages[:4])
        assert sent[0] == len(first_prompt)
        assert sent[1] <= len(second_prompt) - len(first_prompt)  # only the new part
    assert all(reply.strip() for reply in replies)
    flags = "--system brief --max-tokens 8 --temperature 0".split()
    result = _salience(server_target, "chat", *flags, stdin="hi\nand then?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(replies)


def test_cli_reports_an_unreachable_server_in_one_line() -> None:
    result = _salience(UNREACHABLE, "info")
    assert result.returncode == 1
    assert result.stderr == f"salience: cannot reach the server at {UNREACHABLE} (is it running?)\n"


def test_cli_connection_options_go_before_or_after_the_command(server_target: str) -> None:
    """The README's `salience info --target HOST:PORT` (it was "unrecognized arguments")."""
    after = _salience(UNREACHABLE, "info", "--target", server_target, "--timeout", "5")
    assert after.returncode == 0 and "max context:      512" in after.stdout, after.stderr
    before = _salience(server_target, "info")
    assert before.stdout == after.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "--max-tokens", "-1"],
        ["chat", "--seed", "-3"],
        ["chat", "--temperature", "nan"],
        ["score", "--tokens", "1,-1"],
        ["info", "--timeout", "0"],
    ],
)
def test_cli_refuses_values_out_of_range_without_a_traceback(args: list[str]) -> None:
    """They reached the protobuf encoder, which raised with a traceback."""
    result = _salience(UNREACHABLE, *args)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    assert "salience" in result.stderr and ("not" in result.stderr or ">= 0" in result.stderr)


def test_a_session_id_no_server_takes_is_refused_at_once(
    client: SalienceClient, server_target: str
) -> None:
    """Ids travel as x-session-id metadata: a tab or a non-ASCII letter made every call
    fail inside gRPC, retried for seconds. The client refuses them before any call; the
    server refuses them from other clients (INVALID_ARGUMENT)."""
    for bad in ("tab\tid", "ünï", "x" * 129):
        start = time.monotonic()
        with pytest.raises(ValueError, match="visible ASCII"):
            client.open_session(session_id=bad)
        assert time.monotonic() - start < 0.5
    channel = grpc.insecure_channel(server_target)
    stub = salience_pb2_grpc.SalienceStub(channel)
    for bad in ("ünï", "x" * 129):
        with pytest.raises(grpc.RpcError) as caught:
            stub.OpenSession(pb.OpenSessionRequest(session_id=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "INVALID_SESSION_ID"
    channel.close()
    with client.open_session(session_id="my-agent:42") as session:  # punctuation is fine
        assert session.prefill([1]).total_tokens == 1
