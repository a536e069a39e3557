"""Reuse changes nothing: concurrent conversations through a shim with a tiny pool equal,
reply by reply, the same requests sent alone with no reuse at all.

The shim under test keeps two sessions for eight conversations that branch (an earlier
message edited, the last turn regenerated or dropped), ask for ``n`` > 1, logprobs,
stop strings and streams (one client leaving midway), score prompts with ``echo``, and
chain Responses by ``previous_response_id``; its server's KV pool holds about one
conversation, so sessions are offloaded, dropped and recomputed, and idle ones expire
(the shim then replays or starts afresh). The oracle is a second shim on the same
server whose pool is emptied before each request: a fresh session, the whole prompt
prefilled. The tiny Llama (``initializer_range`` 0.1) runs in float32 with greedy
decoding, so a stale prefix or a wrong position shows in the tokens or the logprobs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from salience_client import SalienceClient
from tests.conftest import RunningServer, start_server
from tests.shim_support import RunningShim, start_shim

SESSION_TTL_S = 1.5
PAUSE_S = 1.8
"""A client's pause, past the TTL: its pooled session expires meanwhile."""
SYSTEM = "You answer briefly, about the sea, its ships and its tides. " * 2
"""A system prompt past 64 tokens, which requests over it share through forks."""
WORDS = "sea tide ship sail wind harbor anchor wave gull salt reef storm calm".split()
IGNORED = {"id", "created", "created_at", "completed_at", "previous_response_id", "usage"}
"""Fields that may differ: ids, clocks, and the usage (its cached counts; its token
counts are compared on their own)."""


@dataclass
class Exchange:
    """One request the shim under test answered, and its answer."""

    path: str
    body: dict[str, Any]
    status: int
    reply: Any
    response_id: str | None = None


@dataclass
class Recorder:
    """Every exchange, each client's in its order (a chain's references follow it)."""

    exchanges: list[Exchange] = field(default_factory=list)


@pytest.fixture(scope="module")
def squeezed(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    """A server whose KV pool holds 768 tokens and whose idle sessions expire at once."""
    server = start_server(
        str(tiny_llama_dir),
        block_size=4,
        kv_cache_bytes=768 * 512,
        host_kv_bytes=128 * 512,
        session_ttl_s=SESSION_TTL_S,
    )
    yield server
    server.stop()


def words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))


def chat_body(rng: random.Random, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": copy.deepcopy(messages),
        "temperature": 0,
        "max_tokens": rng.choice([1, 4, 10]),
    }
    if rng.random() < 0.3:
        body["n"] = rng.choice([2, 3])
    if rng.random() < 0.4:
        body.update(logprobs=True, top_logprobs=rng.choice([0, 3]))
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(["a", "e", " "])]
    if rng.random() < 0.15:
        body["prompt_logprobs"] = 2
    return body


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
    """A streamed chat completion put back together as a plain one's choices and usage."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    async with http.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for part in chunk["choices"]:
                choice = choices.setdefault(
                    part["index"], {"content": "", "finish_reason": None, "logprobs": []}
                )
                choice["content"] += part["delta"].get("content") or ""
                choice["finish_reason"] = part["finish_reason"] or choice["finish_reason"]
                choice["logprobs"] += (part.get("logprobs") or {}).get("content") or []
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def shaped(path: str, status: int, reply: Any) -> Any:
    """What is compared of a reply: a plain chat completion's choices and usage as
    ``stream_chat`` shapes a streamed one's (and its prompt's logprobs), another whole."""
    if path != "/chat/completions" or status != 200:
        return reply
    choices = [
        {
            "content": choice["message"]["content"] or "",
            "finish_reason": choice["finish_reason"],
            "logprobs": (choice.get("logprobs") or {}).get("content") or [],
        }
        for choice in sorted(reply["choices"], key=lambda choice: choice["index"])
    ]
    shape = {"choices": choices, "usage": reply["usage"]}
    return shape | {"prompt": reply["prompt_logprobs"]} if "prompt_logprobs" in reply else shape


async def conversation(
    http: httpx.AsyncClient, shim: RunningShim, model: str, seed: int, log: Recorder
) -> None:
    """A chat that continues, regenerates, edits an earlier message or drops its last turn."""
    rng = random.Random(seed)
    url = shim.base_url + "/chat/completions"
    messages = [{"role": "system", "content": SYSTEM}] if seed % 2 else []
    messages.append({"role": "user", "content": words(rng)})
    for _ in range(5):
        body = chat_body(rng, model, messages)
        mode = rng.random()
        if mode < 0.15 and "prompt_logprobs" not in body:  # the client leaves midway
            async with http.stream("POST", url, json=dict(body, stream=True)) as response:
                async for _ in response.aiter_lines():
                    break
            continue
        if mode < 0.4 and "prompt_logprobs" not in body:
            reply = await stream_chat(http, url, body)
            log.exchanges.append(Exchange("/chat/completions", body, 200, reply))
        else:
            response = await http.post(url, json=body)
            reply = shaped("/chat/completions", response.status_code, response.json())
            log.exchanges.append(Exchange("/chat/completions", body, response.status_code, reply))
            if response.status_code != 200:
                return
        users = [i for i, message in enumerate(messages) if message["role"] == "user"]
        step = rng.random()
        if step < 0.5 or len(users) < 2:
            content = reply["choices"][0]["content"]
            messages += [
                {"role": "assistant", "content": content},
                {"role": "user", "content": words(rng)},
            ]
        elif step < 0.75:  # an earlier message edited
            messages = messages[: rng.choice(users)] + [{"role": "user", "content": words(rng)}]
        elif step < 0.9:  # the last turn dropped
            messages = messages[: users[-2] + 1]
        if rng.random() < 0.2:
            await asyncio.sleep(PAUSE_S)


async def scoring(
    http: httpx.AsyncClient, shim: RunningShim, model: str, seed: int, log: Recorder
) -> None:
    """Completions scoring prompts over one context (echo), some decoding past them."""
    rng = random.Random(seed)
    context = SYSTEM[: rng.choice([30, 90])]
    for _ in range(5):
        prompts = [f"{context} {words(rng)}" for _ in range(rng.randint(1, 3))]
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "max_tokens": rng.choice([0, 3]),
            "echo": True,
            "logprobs": rng.choice([0, 2]),
            "temperature": 0,
        }
        response = await http.post(shim.base_url + "/completions", json=body)
        log.exchanges.append(Exchange("/completions", body, response.status_code, response.json()))


async def chain(
    http: httpx.AsyncClient, shim: RunningShim, model: str, seed: int, log: Recorder
) -> None:
    """Responses chained by ``previous_response_id``, at times off an earlier one."""
    rng = random.Random(seed)
    earlier: list[str] = []
    for turn in range(5):
        body: dict[str, Any] = {
            "model": model,
            "input": words(rng),
            "max_output_tokens": rng.choice([2, 8]),
            "temperature": 0,
        }
        if turn == 0:
            body["instructions"] = SYSTEM
        if rng.random() < 0.3:
            body["top_logprobs"] = 2
        if earlier:
            body["previous_response_id"] = earlier[-1] if rng.random() < 0.7 else earlier[0]
        response = await http.post(shim.base_url + "/responses", json=body)
        reply = response.json()
        exchange = Exchange("/responses", body, response.status_code, reply, reply.get("id"))
        log.exchanges.append(exchange)
        if response.status_code != 200:
            return
        earlier.append(reply["id"])
        if rng.random() < 0.3:
            await asyncio.sleep(PAUSE_S)


class Reference:
    """The same requests on a shim whose pool is emptied before each: no reuse at all."""

    def __init__(self, shim: RunningShim, target: str) -> None:
        self.shim = shim
        self.target = target
        self.response_ids: dict[str, str] = {}
        """A response id of the shim under test -> the reference's for the same request."""

    def answer(self, http: httpx.Client, exchange: Exchange) -> tuple[int, Any]:
        pool = self.shim.backend.pool
        held = [session_id for session_id, _ in pool.routes()]
        pool._entries.clear()  # nothing is running on it: the next request starts afresh
        with SalienceClient(self.target, timeout=30) as client:
            for session_id in held:
                client.session(session_id).close()
        body = dict(exchange.body)
        if "previous_response_id" in body:
            body["previous_response_id"] = self.response_ids[body["previous_response_id"]]
        response = http.post(self.shim.base_url + exchange.path, json=body)
        reply = response.json()
        if exchange.response_id is not None and response.status_code == 200:
            self.response_ids[exchange.response_id] = reply["id"]
        return response.status_code, shaped(exchange.path, response.status_code, reply)


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where two JSON values differ (floats by more than 1e-4; ``IGNORED`` keys skipped)."""
    if isinstance(got, dict) and isinstance(want, dict):
        keys = (set(got) | set(want)) - IGNORED
        return [
            d
            for key in sorted(keys)
            for d in differences(got.get(key), want.get(key), f"{where}.{key}")
        ]
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, not {len(want)}"]
        return [
            d
            for i, pair in enumerate(zip(got, want, strict=True))
            for d in differences(*pair, f"{where}[{i}]")
        ]
    if isinstance(got, float) and isinstance(want, (int, float)):
        return [] if abs(got - want) <= 1e-4 else [f"{where}: {got} != {want}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def cached_tokens(reply: Any) -> int:
    """The prompt tokens a reply says were reused."""
    usage = (reply.get("usage") if isinstance(reply, dict) else None) or {}
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def token_counts(reply: Any) -> Any:
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not usage:
        return None
    return {k: v for k, v in usage.items() if k.endswith("tokens") and "cache" not in k}


def test_replies_through_a_tiny_pool_equal_replies_with_no_reuse(
    squeezed: RunningServer,
) -> None:
    shim = start_shim(squeezed.target, max_pooled_sessions=2)
    reference = Reference(start_shim(squeezed.target, max_pooled_sessions=1), squeezed.target)
    log = Recorder()
    try:
        model = shim.client().models.list().data[0].id

        async def run_all() -> None:
            async with httpx.AsyncClient(timeout=60) as http:
                workers = [conversation(http, shim, model, seed, log) for seed in range(5)]
                workers.append(scoring(http, shim, model, 5, log))
                workers += [chain(http, shim, model, seed, log) for seed in (6, 7)]
                await asyncio.gather(*workers)

        asyncio.run(run_all())
        exchanges = log.exchanges
        assert len(exchanges) >= 30
        # Some reused a pooled session (how many depends on timing: what expired).
        assert sum(cached_tokens(exchange.reply) > 0 for exchange in exchanges) >= 1
        found = []
        with httpx.Client(timeout=60) as http:
            for exchange in exchanges:
                status, want = reference.answer(http, exchange)
                got = exchange.reply
                where = f"{exchange.path} {json.dumps(exchange.body)[:300]}"
                if (exchange.status, token_counts(got)) != (status, token_counts(want)):
                    found.append(
                        f"{where}: {exchange.status} {token_counts(got)}, not {status} {token_counts(want)}"
                    )
                found += [f"{where}: {d}" for d in differences(got, want)[:3]]
        assert not found, "\n".join(found[:10])
    finally:
        shim.stop()
        reference.shim.stop()
