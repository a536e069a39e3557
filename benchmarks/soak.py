"""Question: does the server's memory stay bounded under a long mixed workload, and is
everything it held freed once its clients are gone?

Baseline: the server's resident memory (RSS) after the warm-up rounds, when its
allocators, the KV pool and the host-KV budget have grown to their working size.
Measured: its RSS after every later round of the same workload, the growth per round
over the second half of the run (a least-squares slope), and, once the clients are gone
and the session TTL has passed, the sessions, KV blocks and host memory still held.

A round runs, at once: agents taking turns (append, greedy decode), a fork of each
sampling a reply with top-k logprobs, a scoring call, a rewind, a stream cancelled
midway, an Embed call, and sessions closed or left to expire. The pool is small, so
sessions are evicted, offloaded and recomputed as they go. Prints the RSS per round and
the ratio last ÷ baseline: near 1, memory is bounded.

    .venv/bin/python -m benchmarks.soak [--quick] [--rounds 30] [--model DIR]
        [--dtype bfloat16] [--kv-cache-memory 24MiB]
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import _cli
from benchmarks._server import free_port, started_server
from salience_client import AsyncSalienceClient, AsyncSession, Done

ROUNDS, QUICK_ROUNDS = 30, 4
WARM_UP_ROUNDS = 2
AGENTS = 4
TURNS = 3
TTL_S = 3.0
SERVER_FLAGS = ("--host-kv-memory", "16MiB", "--session-ttl", str(TTL_S), "--speculative", "ngram")


def rss_bytes(pid: int) -> int:
    """The process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope(values: list[float]) -> float:
    """The least-squares growth per step of ``values``."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return numerator / sum((x - mean_x) ** 2 for x in range(n))


async def _decode(session: AsyncSession, tokens: list[int], **options: object) -> Done:
    done = None
    async for event in session.generate(tokens, **options):  # type: ignore[arg-type]
        if isinstance(event, Done):
            done = event
    assert done is not None
    return done


async def _agent(client: AsyncSalienceClient, rng: random.Random, words: list[int]) -> None:
    """Turns, a sampled fork with logprobs, scoring, a rewind; closed or left to expire."""
    session = await client.open_session()
    for _ in range(TURNS):
        turn = [rng.choice(words) for _ in range(rng.randint(20, 60))]
        await _decode(session, turn, max_tokens=16)
    child = await session.fork()
    await _decode(child, [rng.choice(words)], max_tokens=12, temperature=1.0, logprob_top_k=5)
    info = await session.info()
    await session.score([rng.choice(words) for _ in range(30)], [(info.length, 2**32 - 1)])
    length = (await session.info()).length
    await _decode(session, [rng.choice(words)], truncate_to=length - 10, max_tokens=4)
    if rng.random() < 0.5:
        await session.close()
        await child.close()  # the others are left for the TTL


async def _cancelled(client: AsyncSalienceClient, words: list[int]) -> None:
    """A stream given up after three tokens."""
    session = await client.open_session()
    stream = session.generate(words[:40], max_tokens=64, ignore_eos=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.aclose()
    await session.close()


async def _round(client: AsyncSalienceClient, rng: random.Random, words: list[int]) -> None:
    texts = [" ".join(str(rng.random()) for _ in range(8)) for _ in range(4)]
    await asyncio.gather(
        *(_agent(client, random.Random(rng.random()), words) for _ in range(AGENTS)),
        _cancelled(client, words),
        client.embed(texts=texts),
    )


async def _held(client: AsyncSalienceClient) -> int:
    """Sessions still open, once idle ones have had their TTL."""
    deadline = time.monotonic() + TTL_S + 30
    while (sessions := await client.list_sessions()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return len(sessions)


def _gauges(metrics_port: int) -> dict[str, float]:
    """The server's KV blocks in use, host memory held, and evictions so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(sample.labels.values())
            values[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return {
        "KV blocks used": values["salience_kv_blocks{used}"],
        "host memory bytes": values["salience_host_memory_bytes"],
        "evictions": values["salience_evictions_total{offloaded}"]
        + values["salience_evictions_total{dropped}"],
    }


async def _run(target: str, pid: int, rounds: int) -> tuple[list[int], int]:
    async with AsyncSalienceClient(target) as client:
        words = await client.tokenize(
            "the agent reads a file, edits a function, runs the tests and writes a summary "
            "of the tool output for the user, who asks for another change to the code"
        )
        rng = random.Random(0)
        sizes = []
        for number in range(rounds):
            start = time.perf_counter()
            await _round(client, rng, words)
            sizes.append(rss_bytes(pid))
            print(
                f"round {number + 1}/{rounds}: {time.perf_counter() - start:.1f} s, "
                f"RSS {sizes[-1] / 2**20:.0f} MiB",
                flush=True,
            )
        return sizes, await _held(client)


def main() -> None:
    parsing = _cli.parser(__doc__, with_dtype=True)
    parsing.add_argument("--rounds", type=int, default=0, help="rounds of the workload")
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    parsing.add_argument("--kv-cache-memory", default="24MiB", help="the server's KV pool")
    args = parsing.parse_args()
    rounds = max(args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS), WARM_UP_ROUNDS + 2)
    metrics_port = free_port()
    flags = [*SERVER_FLAGS, "--dtype", args.dtype, "--metrics-port", str(metrics_port)]
    flags += ["--kv-cache-memory", args.kv_cache_memory]
    if args.model:
        flags += ["--model", args.model]
    with started_server(*flags) as (target, process):
        sizes, sessions_left = asyncio.run(_run(target, process.pid, rounds))
        held = _gauges(metrics_port)
    baseline = sizes[WARM_UP_ROUNDS - 1]
    later = sizes[WARM_UP_ROUNDS:]
    settled = later[len(later) // 2 :] if len(later) >= 6 else later
    growth = slope([float(size) for size in settled])
    print(
        f"RSS after {WARM_UP_ROUNDS} warm-up rounds {baseline / 2**20:.0f} MiB, after round "
        f"{rounds} {sizes[-1] / 2**20:.0f} MiB, peak {max(sizes) / 2**20:.0f} MiB; "
        f"growth over the last {len(settled)} rounds {growth / 2**20:.2f} MiB a round"
    )
    print(
        f"after the TTL: {sessions_left} sessions, {held['KV blocks used']:.0f} KV blocks and "
        f"{held['host memory bytes']:.0f} bytes of host memory held; "
        f"{held['evictions']:.0f} evictions in the run"
    )
    print(f"RSS last ÷ after warm-up: {sizes[-1] / baseline:.3f}")


if __name__ == "__main__":
    main()
