"""What the client and CLI tests share: a real server process on the tiny Llama, the
prompt, and the oracle's range sums."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from salience_client import SalienceClient
from tests.helpers import server_command
from tests.tiny_models import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
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


@contextlib.contextmanager
def served_tiny_llama(model_dir: Path, log_dir: Path) -> Iterator[str]:
    """``host:port`` of a real server process serving ``model_dir``, SERVING."""
    log_path = log_dir / "server.log"
    options = "--port 0 --block-size 4 --kv-cache-memory 8MiB".split()
    command = server_command("--model", str(model_dir), *options)
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


def oracle_sum(logprobs: Any, token_ids: list[int], start: int, end: int) -> float:
    """Sum of log P(token_p | tokens_<p) for p in [start, end); position 0 counts 0."""
    return sum(
        float(logprobs[p - 1, token_ids[p]]) for p in range(max(start, 1), min(end, len(token_ids)))
    )
