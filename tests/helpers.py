"""Small helpers for talking to a server through raw stubs in tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import torch
from grpc_status import rpc_status
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from salience_client.pb import salience_pb2 as pb
from salience_server.engine.kv_pool import CPU_DEFAULT_KV_BYTES

U32_MAX = 0xFFFFFFFF


@contextlib.contextmanager
def engine_held_in_a_step(engine: Any) -> Iterator[threading.Event]:
    """Holds ``engine`` inside its next step's forward pass until the block ends;
    yields an event set once a step is held."""
    gate, in_step = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def held_step(*args: Any, **kwargs: Any) -> Any:
        in_step.set()
        gate.wait(30)
        return execute(*args, **kwargs)

    engine.runner.execute = held_step
    try:
        yield in_step
    finally:
        gate.set()
        engine.runner.execute = execute


def metric_samples(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A running server's metrics: (name, sorted labels) -> value."""
    text = generate_latest(server.server.metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def is_printed_quotient(
    quotient: float, numerator: float, denominator: float, places: int, quotient_places: int
) -> bool:
    """Whether ``quotient``, printed to ``quotient_places`` decimals, can be the quotient
    of the two values printed to ``places`` decimals as ``numerator`` and
    ``denominator`` (a benchmark's ratio of two small times, each rounded)."""
    half, slack = 0.5 * 10**-places, 0.5 * 10**-quotient_places
    low = (numerator - half) / (denominator + half)
    high = (numerator + half) / (denominator - half)
    return low - slack <= quotient <= high + slack


def open_session(stub: Any, **kwargs: Any) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(**kwargs)).session_id


def session_info(stub: Any, session_id: str) -> pb.SessionInfo:
    """GetSession's view of ``session_id``."""
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session


def generate(stub: Any, session_id: str, **kwargs: Any) -> tuple[list[pb.Token], pb.Done]:
    """Runs one Generate call to the end: (token events, done)."""
    ranges = {
        key: [pb.PositionRange(start=s, end=e) for s, e in kwargs.pop(key)]
        for key in ("logprobs_ranges", "readout_ranges")
        if key in kwargs
    }
    request = pb.GenerateRequest(session_id=session_id, **kwargs, **ranges)
    tokens, done = [], None
    for event in stub.Generate(request):
        if event.HasField("token"):
            tokens.append(event.token)
        else:
            done = event.done
    assert done is not None, "the stream ended without Done"
    return tokens, done


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error}"
    from google.rpc import error_details_pb2

    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status details")


def reference_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[L, V] raw logprobs of one plain transformers forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def reference_greedy(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """transformers generate(do_sample=False) as new token ids (EOS included, then stop)."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return output[0, len(prompt_ids) :].tolist()


TEST_DEVICE = os.environ.get("SALIENCE_TEST_DEVICE", "cpu")
"""Where the tests' servers run their models: ``cpu`` (CI), or ``cuda`` to hold the same
oracles to a GPU (scripts/gpu_check.sh). Float32 unless a test asks for another dtype, so
one tolerance serves both."""


def server_command(*args: str) -> list[str]:
    """``salience-server ARGS`` for a test's server process: on the tests' device, in
    float32 (the oracles' dtype; a GPU's default is bf16), with the CPU's default KV pool
    (a GPU's default takes most of its free memory, which the servers of tests running
    side by side would fight over). ``args`` come last and override these."""
    kv_bytes = str(CPU_DEFAULT_KV_BYTES)
    defaults = ["--device", TEST_DEVICE, "--dtype", "float32", "--kv-cache-memory", kv_bytes]
    return [sys.executable, "-m", "salience_server", *defaults, *args]


def server_start_failure(*args: str, env: dict[str, str] | None = None) -> str:
    """Runs ``salience-server ARGS`` (with ``env`` added to the environment), which must
    fail at start: exit 1, one logged error line, no traceback. Returns its stderr."""
    result = subprocess.run(
        server_command(*args),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


_PORTS = (10_000 + (os.getpid() * 211 + i) % 10_000 for i in itertools.count())
"""Ports from 10,000 to 19,999 in turn, from a start of this process's own."""


def free_port() -> int:
    """A TCP port free on loopback now, never handed out twice in one process, and
    below the kernel's ephemeral range (from 32,768): a port the kernel chose for a
    bind to port 0 could be taken by an outgoing connection before the server bound it
    (a test under load once found its metrics port held)."""
    for port in _PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the ports go on for ever")


def random_tokens(count: int, seed: int) -> list[int]:
    """``count`` byte-token ids drawn from one seeded generator."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(count)]


def check_sessions_against_transformers(
    stub: Any, oracle: torch.nn.Module, cuts: list[int], prompt_step: int, max_tokens: int
) -> None:
    """Two oracles at once. One session appends random tokens in chunks cut at ``cuts``
    and scores every position: equal to one plain forward pass. Then eight sessions
    (prompts growing by ``prompt_step``) decode greedily together: each equal to
    transformers ``generate``."""
    rng = random.Random(11)
    token_ids = [rng.randrange(256) for _ in range(cuts[-1])]
    session_id = open_session(stub)
    scored = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        tokens, _ = generate(
            stub,
            session_id,
            append_tokens=token_ids[start:end],
            offset=start,
            logprobs_ranges=[(max(start, 1), U32_MAX)],
        )
        scored.extend(tokens)
    got = torch.tensor([t.sampled_logprob for t in scored])
    positions = torch.arange(len(token_ids) - 1)
    want = reference_logprobs(oracle, token_ids)[positions, torch.tensor(token_ids[1:])]
    assert (got - want).abs().max().item() < 1e-4

    prompts = [[rng.randrange(256) for _ in range(3 + prompt_step * i)] for i in range(8)]
    together: list[list[int]] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> None:
        session_id = open_session(stub)
        barrier.wait()
        tokens, _ = generate(stub, session_id, append_tokens=prompts[index], max_tokens=max_tokens)
        together[index] = [t.id for t in tokens]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == [reference_greedy(oracle, prompt, max_tokens) for prompt in prompts]


def use_flash_backend(monkeypatch: Any, kernel: Any, block_size: int) -> None:
    """Makes servers started after this run the flash-attn backend over ``kernel``
    (CPU has no flash-attn: the stand-in, or a kernel that fails)."""
    from salience_server.engine import paged_attention
    from salience_server.engine.flash_attention import FlashAttentionBackend

    def flash_backend(name: str, device: torch.device, *args: Any, **kwargs: Any) -> Any:
        return FlashAttentionBackend(kernel, block_size, device)

    monkeypatch.setattr(paged_attention, "select_backend", flash_backend)
