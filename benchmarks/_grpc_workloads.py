"""The same workloads through Salience's gRPC API, as a client that keeps sessions would
send them: an agent appends each turn to its session; scoring and prefix reuse fork a
session holding the shared text (copy-on-write KV, no prefill of it again).

Prompts are the same text as the HTTP workloads, rendered with the same chat template.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._openai_workloads import prefix_summary, throughput_levels
from benchmarks._prompts import Plan, Texts
from benchmarks._report import Progress, Turn, by_turn
from salience_client import AsyncSalienceClient, AsyncSession, TokenEvent


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    return next((i for i in range(limit) if a[i] != b[i]), limit)


async def decode(
    session: AsyncSession, append_ids: list[int], max_tokens: int, truncate_to: int | None = None
) -> tuple[list[int], str, float, float]:
    """(decoded ids, their text, seconds to the first decoded token, seconds to Done)."""
    start = time.perf_counter()
    first: float | None = None
    ids, parts = [], []
    async for event in session.generate(append_ids, truncate_to=truncate_to, max_tokens=max_tokens):
        if isinstance(event, TokenEvent) and not event.is_prefill:
            first = first if first is not None else time.perf_counter()
            ids.append(event.token_id)
            parts.append(event.text)
    end = time.perf_counter()
    return ids, "".join(parts), (first if first is not None else end) - start, end - start


async def warm_up(target: str) -> None:
    async with AsyncSalienceClient(target) as client, await client.open_session() as session:
        await decode(session, await client.tokenize("Once upon a time"), 4)


async def agent(
    target: str, plan: Plan, texts: Texts, name: str, resend: bool = False
) -> dict[str, Any]:
    """One session per conversation, each turn appending only what it does not hold;
    with ``resend``, a fresh session given the whole history every turn instead (the
    stateless baseline on the same engine)."""
    sizes = plan.sizes
    progress = Progress(name, "agent", sizes.num_conversations * sizes.num_turns, "turns")
    async with AsyncSalienceClient(target) as client:

        async def conversation(index: int) -> list[Turn]:
            messages = [{"role": "system", "content": plan.system}]
            kept = await client.open_session()
            held: list[int] = []
            turns = []
            for number, user in enumerate(plan.users[index], start=1):
                messages.append({"role": "user", "content": user})
                ids = texts.chat_ids(messages)
                session = await client.open_session() if resend else kept
                shared = 0 if resend else common_prefix_length(held, ids)
                reply_ids, reply, ttft, latency = await decode(
                    session, ids[shared:], sizes.turn_decode_tokens, truncate_to=shared
                )
                if resend:
                    await session.close()
                held = ids + reply_ids
                messages.append({"role": "assistant", "content": reply})
                turns.append(Turn(index, number, len(ids), ttft, latency, len(reply_ids)))
                progress.step()
            await kept.close()
            return turns

        start = time.perf_counter()
        results = await asyncio.gather(*(conversation(i) for i in range(sizes.num_conversations)))
        total = time.perf_counter() - start
    turns = [turn for result in results for turn in result]
    return {
        "status": "ok",
        "total_s": total,
        "turns": [vars(t) for t in turns],
        "by_turn": by_turn(turns),
    }


async def throughput(target: str, plan: Plan, texts: Texts, name: str) -> dict[str, Any]:
    """Independent requests at once, each on its own session."""
    sizes = plan.sizes
    progress = Progress(name, "throughput", sum(sizes.throughput_levels), "requests")
    async with AsyncSalienceClient(target) as client:

        async def one(prompt: str) -> int:
            async with await client.open_session() as session:
                ids = texts.tokenizer.encode(prompt, add_special_tokens=True)
                decoded, *_ = await decode(session, ids, sizes.throughput_decode_tokens)
            progress.step()
            return len(decoded)

        return await throughput_levels(plan, one)


async def scoring(target: str, plan: Plan, texts: Texts, name: str) -> dict[str, Any]:
    """The document prefilled once; each continuation scored on a fork of it."""
    sizes = plan.sizes
    document_ids = texts.tokenizer.encode(plan.document, add_special_tokens=True)
    continuations = [
        texts.tokenizer.encode(c, add_special_tokens=False) for c in plan.continuations
    ]
    gate = asyncio.Semaphore(sizes.scoring_concurrency)
    progress = Progress(name, "scoring", sizes.num_continuations, "continuations")
    async with AsyncSalienceClient(target) as client:

        async def one(document: AsyncSession, ids: list[int]) -> float:
            async with gate:
                async with await document.fork() as fork:
                    span = (len(document_ids), len(document_ids) + len(ids))
                    (score,) = await fork.score(ids, [span])
            progress.step()
            return score

        start = time.perf_counter()
        async with await client.open_session() as document:
            await document.prefill(document_ids)
            scores = await asyncio.gather(*(one(document, ids) for ids in continuations))
        wall = time.perf_counter() - start
    scored = sum(len(ids) for ids in continuations)
    return {
        "status": "ok",
        "scored_tokens": scored,
        "wall_s": wall,
        "scored_tok_s": scored / wall,
        "first_logprob_sum": scores[0],
    }


async def prefix(target: str, plan: Plan, texts: Texts, name: str) -> dict[str, Any]:
    """The first request prefills the shared system prompt into a session; each request
    forks it and appends only its question."""
    rendered = [
        texts.chat_ids([{"role": "system", "content": plan.prefix}, {"role": "user", "content": q}])
        for q in plan.questions
    ]
    shared = (
        common_prefix_length(rendered[0], rendered[1]) if len(rendered) > 1 else len(rendered[0])
    )
    progress = Progress(name, "prefix reuse", len(rendered), "requests")
    requests = []
    async with AsyncSalienceClient(target) as client, await client.open_session() as base:
        for ids in rendered:
            start = time.perf_counter()
            if base.length == 0:
                await base.prefill(ids[:shared])
            async with await base.fork() as fork:
                forked = time.perf_counter()
                _, _, ttft, latency = await decode(
                    fork, ids[shared:], plan.sizes.prefix_decode_tokens
                )
            # Both from the request's start: the first one's prefill of the prefix counts.
            setup = forked - start
            requests.append({"ttft_s": setup + ttft, "latency_s": setup + latency})
            progress.step()
    return prefix_summary(requests)
