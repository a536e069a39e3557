"""The four workloads through the openai SDK, as any server's user would send them.

Every request is greedy (temperature 0). Chat is streamed, so that time to first token
is the first chunk that carries text. Nothing server-specific is sent: a field one
server does not know would be a 422 from transformers serve.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from benchmarks._prompts import Plan, Texts
from benchmarks._report import Progress, Turn, by_turn, unsupported

REQUEST_TIMEOUT_S = 1800.0


def client(base_url: str) -> AsyncOpenAI:
    """No retries: a failure must show, not be hidden behind a second try."""
    return AsyncOpenAI(
        base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
    )


async def warm_up(api: AsyncOpenAI, model: str) -> None:
    """One short chat and one completion, untimed: first-request set-up is not measured."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
    await api.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    await api.completions.create(
        model=model, prompt="Once upon a time", max_tokens=4, temperature=0
    )


async def stream_chat(
    api: AsyncOpenAI, model: str, messages: list[ChatCompletionMessageParam], max_tokens: int
) -> tuple[str, float, float]:
    """(reply text, seconds to the first text, seconds to the end)."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    stream = await api.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return "".join(parts), (first if first is not None else end) - start, end - start


async def agent(
    api: AsyncOpenAI, model: str, plan: Plan, texts: Texts, name: str
) -> dict[str, Any]:
    """Conversations at once, each resending its whole history every turn (what a
    stateless chat client does)."""
    sizes = plan.sizes
    progress = Progress(name, "agent", sizes.num_conversations * sizes.num_turns, "turns")

    async def conversation(index: int) -> list[Turn]:
        messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": plan.system}]
        turns = []
        for number, user in enumerate(plan.users[index], start=1):
            messages.append({"role": "user", "content": user})
            history = len(texts.chat_ids(messages))
            reply, ttft, latency = await stream_chat(api, model, messages, sizes.turn_decode_tokens)
            messages.append({"role": "assistant", "content": reply})
            turns.append(Turn(index, number, history, ttft, latency, texts.count(reply)))
            progress.step()
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


async def throughput(
    api: AsyncOpenAI, model: str, plan: Plan, texts: Texts, name: str
) -> dict[str, Any]:
    """Independent completions at once, for each concurrency level: output tokens per
    second of wall time (prefills included, as the user waits for them)."""
    sizes = plan.sizes
    progress = Progress(name, "throughput", sum(sizes.throughput_levels), "requests")

    async def one(prompt: str) -> int:
        reply = await api.completions.create(
            model=model, prompt=prompt, max_tokens=sizes.throughput_decode_tokens, temperature=0
        )
        progress.step()
        if reply.usage is not None and reply.usage.completion_tokens:
            return reply.usage.completion_tokens
        return texts.count(reply.choices[0].text)

    return await throughput_levels(plan, one)


async def throughput_levels(plan: Plan, one: Callable[[str], Awaitable[int]]) -> dict[str, Any]:
    """Runs each concurrency level's prompts at once through ``one`` (a request that
    returns its output token count): output tokens per second by level, the largest
    level as the headline."""
    levels = []
    for level, prompts in plan.throughput_prompts.items():
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
        levels.append(
            {
                "concurrency": level,
                "wall_s": wall,
                "output_tokens": sum(counts),
                "output_tok_s": sum(counts) / wall,
            }
        )
    return {"status": "ok", "levels": levels, "output_tok_s": levels[-1]["output_tok_s"]}


async def scoring(
    api: AsyncOpenAI, model: str, plan: Plan, texts: Texts, name: str
) -> dict[str, Any]:
    """Log-probability of each continuation after the document, as lm-eval asks for it:
    ``/v1/completions`` with echo, logprobs=1 and max_tokens=1, the prompt's positions
    after the document summed."""
    sizes = plan.sizes
    probe = await _score_one(api, model, plan.document, plan.continuations[0])
    if probe is None:
        return unsupported(
            "/v1/completions returns no prompt log-probabilities for echo + logprobs"
        )
    gate = asyncio.Semaphore(sizes.scoring_concurrency)
    progress = Progress(name, "scoring", sizes.num_continuations, "continuations")

    async def one(continuation: str) -> float | None:
        async with gate:
            score = await _score_one(api, model, plan.document, continuation)
        progress.step()
        return score

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one(c)) for c in plan.continuations]
    # Past the time limit, the requests still queued or in flight are cancelled.
    finished, unfinished = await asyncio.wait(tasks, timeout=sizes.scoring_time_limit_s)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    wall = time.perf_counter() - start
    scores = [
        (continuation, task.result())
        for continuation, task in zip(plan.continuations, tasks, strict=True)
        if task in finished
    ]
    if any(score is None for _, score in scores):
        raise RuntimeError("a scoring reply lost its prompt log-probabilities")
    scored = sum(texts.count(continuation) for continuation, _ in scores)
    result: dict[str, Any] = {
        "status": "ok",
        "scored_tokens": scored,
        "wall_s": wall,
        "scored_tok_s": scored / wall,
        "first_logprob_sum": tasks[0].result() if tasks[0] in finished else None,
    }
    if unfinished:
        result["note"] = (
            f"{len(scores)} of {len(tasks)} continuations scored within the "
            f"{sizes.scoring_time_limit_s:.0f} s limit; the rate is theirs"
        )
    return result


async def _score_one(
    api: AsyncOpenAI, model: str, document: str, continuation: str
) -> float | None:
    """The continuation's summed logprob, or None when the reply has no prompt logprobs."""
    reply = await api.completions.create(
        model=model,
        prompt=document + continuation,
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    logprobs = reply.choices[0].logprobs
    if logprobs is None or not logprobs.token_logprobs or not logprobs.text_offset:
        return None
    decoded = reply.usage.completion_tokens if reply.usage is not None else 1
    pairs = list(zip(logprobs.text_offset, logprobs.token_logprobs, strict=False))
    prompt_pairs = pairs[: len(pairs) - decoded]
    picked = [lp for offset, lp in prompt_pairs if offset >= len(document) and lp is not None]
    return float(sum(picked)) if picked else None


async def prefix(
    api: AsyncOpenAI, model: str, plan: Plan, texts: Texts, name: str
) -> dict[str, Any]:
    """Requests one after another that share a long system prompt: the first pays for
    it; a server that keeps the prefix serves the rest faster."""
    progress = Progress(name, "prefix reuse", len(plan.questions), "requests")
    requests = []
    for question in plan.questions:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": plan.prefix},
            {"role": "user", "content": question},
        ]
        _, ttft, latency = await stream_chat(api, model, messages, plan.sizes.prefix_decode_tokens)
        requests.append({"ttft_s": ttft, "latency_s": latency})
        progress.step()
    return prefix_summary(requests)


def prefix_summary(requests: list[dict[str, float]]) -> dict[str, Any]:
    """The first request against the median of the rest."""
    first = requests[0]["latency_s"]
    rest = statistics.median(r["latency_s"] for r in requests[1:])
    return {
        "status": "ok",
        "requests": requests,
        "first_s": first,
        "rest_median_s": rest,
        "first_over_rest": first / rest,
    }


WORKLOADS = {"agent": agent, "throughput": throughput, "scoring": scoring, "prefix": prefix}
