"""The ``salience`` command line against a real server process on the tiny Llama."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from salience_client import END, SalienceClient
from salience_client.cli import ChatSession
from tests.client_support import (
    PROMPT,
    PROMPT_TEXT,
    REPO,
    TOKENIZER,
    UNREACHABLE,
    oracle_sum,
)
from tests.helpers import reference_logprobs
from tests.tiny_models import reference_model


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir: Path) -> Any:
    return reference_model(tiny_llama_dir)


def _salience(
    target: str, *args: str | bytes, stdin: str | bytes = ""
) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "salience"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "salience_client.cli"]
    result = subprocess.run(
        [*command, "--target", target, *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
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
    want = oracle_sum(reference_logprobs(oracle, PROMPT), PROMPT, 0, END)
    match = re.fullmatch(rf"total logprob: (\S+) over {len(PROMPT) - 1} tokens .*", lines[-1])
    assert match and float(match.group(1)) == pytest.approx(want, abs=1e-3)
    by_tokens = _salience(server_target, "score", "--tokens", ",".join(map(str, PROMPT)))
    assert by_tokens.stdout == result.stdout
    # A character split over tokens (the tiny model's tokens are bytes) prints its bytes.
    split = _salience(server_target, "score", "é").stdout.splitlines()
    assert "'\\xc3'" in split[1] and "'\\xa9'" in split[2], split
    # "-" reads the text from standard input.
    assert _salience(server_target, "score", "-", stdin=PROMPT_TEXT).stdout == result.stdout


def test_cli_refuses_text_that_is_not_utf8_in_one_line(server_target: str) -> None:
    """Bytes that are not UTF-8 on the command line or standard input (Python reads them
    as lone surrogates): score ended in a traceback, chat sent them to the server."""
    latin1 = "café".encode("latin-1")
    for result in (
        _salience(server_target, "score", latin1),
        _salience(server_target, "score", "-", stdin=latin1),
    ):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == "salience: the text to score is not valid UTF-8\n"
    flags = "--max-tokens 2 --temperature 0".split()
    chat = _salience(server_target, "chat", *flags, stdin=latin1 + b"\nhi\n")
    assert chat.returncode == 1 and "Traceback" not in chat.stderr
    assert chat.stderr.startswith("salience: the line is not valid UTF-8; nothing sent\n")
    assert chat.stdout.count("\n") == 1  # the next line got its reply


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


def test_cli_chat_takes_a_message_of_several_lines(
    server_target: str, client: SalienceClient
) -> None:
    """A line ending in a backslash goes on to the next: one turn, its lines joined by
    line breaks (each line was a turn of its own)."""
    with client.open_session() as session:
        out = io.StringIO()
        chat = ChatSession(client, session, system=None)
        chat.turn("first line\nsecond line", out, max_tokens=8, temperature=0.0)
    flags = "--max-tokens 8 --temperature 0".split()
    result = _salience(server_target, "chat", *flags, stdin="first line\\\nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == out.getvalue()


def test_cli_chat_goes_on_after_a_failed_turn_and_exits_1(server_target: str) -> None:
    """A turn past the context is reported and the conversation goes on; the exit status
    tells a script that some turn got no reply (it was 0)."""
    flags = "--max-tokens 4 --temperature 0".split()
    result = _salience(server_target, "chat", *flags, stdin="hi\n" + "word " * 600 + "\nok\n")
    assert result.returncode == 1
    assert "[INVALID_ARGUMENT, CONTEXT_EXCEEDED]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count("\n") == 3  # a reply line for each turn, empty for the failed
    clean = _salience(server_target, "chat", *flags, stdin="hi\n")
    assert clean.returncode == 0, clean.stderr


@pytest.mark.parametrize("command", [["info"], ["chat"], ["score", "some text"]])
def test_cli_reports_an_unreachable_server_in_one_line(command: list[str]) -> None:
    start = time.monotonic()
    result = _salience(UNREACHABLE, *command, stdin="hi\n")
    assert time.monotonic() - start < 5  # chat and score took 6 s, retrying OpenSession
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
        ["info", "--timeout", "inf"],
        ["score", "text", "--tokens", "1"],
        ["score", "--tokens", "1", "--add-special-tokens"],  # taken, and nothing added
    ],
)
def test_cli_refuses_values_out_of_range_without_a_traceback(args: list[str]) -> None:
    """They reached the protobuf encoder, which raised with a traceback."""
    result = _salience(UNREACHABLE, *args)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    assert "salience" in result.stderr and ("not" in result.stderr or ">= 0" in result.stderr)


def test_cli_refuses_a_target_that_is_no_grpc_address() -> None:
    """An empty target printed grpc's C-core error lines; the shim's HTTP URL said the
    server could not be reached."""
    for target, says in (
        ("", "the target is empty, not HOST:PORT"),
        ("http://127.0.0.1:8000", "is an HTTP URL; give the gRPC server's HOST:PORT"),
    ):
        result = _salience(target, "info")
        assert result.returncode == 2, result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 3  # argparse's usage (two lines) and the error
