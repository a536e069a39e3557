"""Question: what does the OpenAI shim cost a streamed token, and how many streams can
one shim process carry?

Baseline: the same concurrent streams read straight from the gRPC server (one asyncio
client, as ``benchmarks/concurrency.py``). Measured: those streams as ``/v1/completions``
SSE streams through a ``salience-shim`` process in front of the same server, at 1, 8
and 32 streams (decoding 64 tokens each from distinct short prompts, ``ignore_eos``):
the aggregate decode tokens per second each way (the ratio: near 1, the shim does not
slow the streams), and the shim process's CPU time per streamed token, whence the
tokens per second one shim core can carry at most, against what the server delivered
(the share of that core the server's rate takes: well below 1, one shim keeps up; near
1, run several shims, docs/scale-out.md). Linux (reads the processes' CPU times).

    .venv/bin/python -m benchmarks.shim_cost [--quick] [--model DIR] [--dtype bfloat16]
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import psutil

from benchmarks._cli import parser
from benchmarks._server import free_port, started_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc

NUM_TOKENS = 64
LEVELS = (1, 8, 32)
QUICK_TOKENS = 16
QUICK_LEVELS = (1, 4)


def prompts(count: int) -> list[list[int]]:
    """Distinct short prompts as token ids (below 128: in any model's vocabulary)."""
    return [[40 + i, 80 + i % 40, 20 + i % 7, 41 + i] for i in range(count)]


def cpu_s(process: psutil.Process) -> float:
    """The process's CPU time so far (user and system, all its threads)."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def direct(target: str, prompt_ids: list[list[int]], num_tokens: int) -> float:
    """Aggregate decode tokens per second of the streams read over gRPC."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        stamps: list[list[float]] = [[] for _ in prompt_ids]

        async def run(index: int) -> None:
            opened = await stub.OpenSession(pb.OpenSessionRequest())
            request = pb.GenerateRequest(
                session_id=opened.session_id,
                append_tokens=prompt_ids[index],
                max_tokens=num_tokens,
                ignore_eos=True,
                return_text=True,  # as the shim asks: text comes with each token
            )
            async for event in stub.Generate(request):
                if event.HasField("token"):
                    stamps[index].append(time.perf_counter())
            await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))

        await asyncio.gather(*(run(i) for i in range(len(prompt_ids))))
    return decode_rate(stamps)


async def through_shim(base_url: str, prompt_ids: list[list[int]], num_tokens: int) -> float:
    """Aggregate decode tokens per second of the streams read as SSE from the shim."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        stamps: list[list[float]] = [[] for _ in prompt_ids]

        async def run(index: int) -> None:
            body = {
                "model": model,
                "prompt": prompt_ids[index],
                "max_tokens": num_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        stamps[index].append(time.perf_counter())

        await asyncio.gather(*(run(i) for i in range(len(prompt_ids))))
    return decode_rate(stamps)


def decode_rate(stamps: list[list[float]]) -> float:
    """Tokens per second from the moment every stream has its first token (prefills
    done) to the last token."""
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    return sum(sum(1 for t in s if t > start) for s in stamps) / (end - start)


@contextlib.contextmanager
def running_shim(target: str) -> Iterator[tuple[str, psutil.Process]]:
    """A ``salience-shim`` process in front of ``target``: its base URL and process."""
    port = free_port()
    command = [sys.executable, "-m", "salience_server.http", "--target", target]
    command += ["--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the shim did not start")
            time.sleep(0.2)
        yield base_url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parsing = parser(__doc__, with_dtype=True)
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    args = parsing.parse_args()
    levels, num_tokens = (QUICK_LEVELS, QUICK_TOKENS) if args.quick else (LEVELS, NUM_TOKENS)
    options = ["--dtype", args.dtype] + (["--model", args.model] if args.model else [])
    with started_server(*options) as (target, _), running_shim(target) as (base_url, shim):
        all_prompts = prompts(max(levels))
        asyncio.run(direct(target, all_prompts[:2], 4))  # warm-up, both ways
        asyncio.run(through_shim(base_url, all_prompts[:2], 4))
        for n in levels:
            direct_rate = asyncio.run(direct(target, all_prompts[:n], num_tokens))
            before = cpu_s(shim)
            shim_rate = asyncio.run(through_shim(base_url, all_prompts[:n], num_tokens))
            per_token_s = (cpu_s(shim) - before) / (n * num_tokens)
            ceiling = 1 / per_token_s
            print(
                f"{n:2d} streams: {shim_rate:7.1f} tok/s through the shim, "
                f"{shim_rate / direct_rate:.2f}x over gRPC ({direct_rate:.1f} tok/s); the shim "
                f"spends {per_token_s * 1e6:.0f} us of CPU a token: one core carries "
                f"{ceiling:.0f} tok/s, {direct_rate / ceiling:.2f}x of it taken"
            )


if __name__ == "__main__":
    main()
