"""The shim's session pool when it is full (``--max-pooled-sessions``) or the server
holds no more sessions (``--max-sessions``): which sessions it forks, lends or closes,
against a real server on the tiny Llama."""

from __future__ import annotations

import asyncio
from typing import Any

from salience_client import AsyncSalienceClient, SalienceClient, TokenEvent
from salience_server.http.backend import Backend, RenderOptions
from salience_server.http.config import ShimConfig
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.generation import Generation, collect
from salience_server.http.sessions_pool import SessionPool
from tests.pool_support import GREEDY, run_with_pool, wait_for_sessions


def test_a_full_pool_makes_room_to_share_a_long_prefix(llama_server: Any) -> None:
    """Once the pool held its most sessions, requests arriving together over one long
    prefix no longer shared it: the first was lent the session holding it, the others
    prefilled it again. Siblings (a batch's prompts) now fork it, the least recently
    used idle session closing to make room."""
    long_prompt = list(range(40, 120))  # 80 tokens, past FORK_MIN_SHARED

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        for start in (200, 210):  # the pool full of other conversations
            await collect(Generation(pool, list(range(start, start + 5)), GREEDY))
        await collect(Generation(pool, long_prompt, DecodeOptions(max_tokens=0)))
        assert pool.num_sessions == 3
        generations = [Generation(pool, long_prompt + [turn], GREEDY) for turn in (1, 2)]
        for generation in generations:
            generation.has_siblings = True
        results = await asyncio.gather(*(collect(g) for g in generations))
        assert [r.cached_tokens for r in results] == [80, 80]
        # Each fork closed the least recent conversation; the prefix's session, which
        # its children hold, went as they came back.
        assert pool.num_sessions == 2
        await wait_for_sessions(client, 2)
        assert sorted(s.length for s in await client.list_sessions()) == [85, 85]

    run_with_pool(llama_server.target, test, max_sessions=3)


def test_a_full_pool_forks_for_requests_branching_off_together(llama_server: Any) -> None:
    """Separate requests sent together over one system prompt into a full pool (an RL
    pipeline's rollouts, each its own request): the first was lent the session holding
    the prompt and an earlier conversation, and the others prefilled the prompt again
    (cached 80, then far less). A request branching off inside what an earlier one sent
    now forks that session, so the others find it too."""
    long_prompt = list(range(40, 120))  # 80 tokens, past FORK_MIN_SHARED

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        for start in (200, 210, 220):  # the pool full of other conversations
            await collect(Generation(pool, list(range(start, start + 5)), GREEDY))
        await collect(Generation(pool, long_prompt + [1, 2], GREEDY))  # one over the prompt
        assert pool.num_sessions == 4
        prompts = [long_prompt + [turn] for turn in (3, 4, 5)]
        results = await asyncio.gather(*(collect(Generation(pool, p, GREEDY)) for p in prompts))
        assert [r.cached_tokens for r in results] == [80, 80, 80]
        for prompt, result in zip(prompts, results, strict=True):  # as from a fresh session
            async with await client.open_session() as fresh:
                events = fresh.generate(prompt, max_tokens=GREEDY.max_tokens)
                want = [e.token_id async for e in events if isinstance(e, TokenEvent)]
            assert [t.token_id for t in result.choices[0].tokens] == want

    run_with_pool(llama_server.target, test, max_sessions=4)


def test_a_full_pool_lends_a_lone_conversation_its_own_session(llama_server: Any) -> None:
    """As many conversations as the pool holds, taking turns: each turn is lent its own
    conversation's session. A full pool that closed another session to fork each turn
    (the fork's parent then closed as the turn came back) lost one conversation a turn."""
    conversations = [list(range(start, start + 70)) for start in (20, 100, 180)]

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        for conversation in conversations:
            await collect(Generation(pool, conversation, DecodeOptions(max_tokens=0)))
        for _ in range(2):  # rounds of one turn each
            for conversation in conversations:
                conversation += [7, 8]
                result = await collect(Generation(pool, conversation, DecodeOptions(max_tokens=0)))
                assert result.cached_tokens == len(conversation) - 2
        assert pool.num_sessions == 3

    run_with_pool(llama_server.target, test, max_sessions=3)


def test_a_full_pool_lends_a_thinking_conversation_its_own_session(llama_server: Any) -> None:
    """As above, with a template whose generation prompt opens the reply with a token the
    next turn's rendering of history leaves out (``<think>``): each turn shares one token
    less than the last one sent, which is no branch. Read as one, every turn closed
    another conversation's session to fork."""
    think = 9
    conversations = [list(range(start, start + 70)) for start in (20, 100, 180)]

    async def turn(pool: SessionPool, conversation: list[int]) -> int:
        prompt = conversation + [think]
        generation = Generation(pool, prompt, DecodeOptions(max_tokens=0), prompt_tail=1)
        return (await collect(generation)).cached_tokens

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        for conversation in conversations:
            await turn(pool, conversation)
        for _ in range(2):  # rounds of one turn each
            for conversation in conversations:
                conversation += [7, 8]
                assert await turn(pool, conversation) == len(conversation) - 2
        assert pool.num_sessions == 3
        await wait_for_sessions(client, 3)

    run_with_pool(llama_server.target, test, max_sessions=3)


def test_the_pool_stays_bounded(llama_server: Any) -> None:
    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        for start in (0, 50, 100):  # one after another: the least recent is rewound
            await collect(Generation(pool, list(range(start, start + 5)), GREEDY))
        assert pool.num_sessions == 2 and len(await client.list_sessions()) == 2
        leases = [await pool.acquire([start]) for start in (1, 2, 3)]  # all lent: a third
        assert pool.num_sessions == 3
        for lease in leases:
            pool.release(lease, [])
        assert pool.num_sessions == 2  # the least recently used was closed
        await wait_for_sessions(client, 2)
        assert len(await client.list_sessions()) == 2

    run_with_pool(llama_server.target, test, max_sessions=2)


def test_a_server_full_of_sessions_gets_the_pools_own_idle_ones_reused(
    tiny_llama_dir: Any, server_factory: Any
) -> None:
    """The server holds at most 3 sessions (``--max-sessions``), the pool may keep 8.
    With the server full, a prompt sharing nothing reuses the pool's least recently used
    idle session, and one that would fork a long shared prefix is lent its parent: each
    got a 429 (TOO_MANY_SESSIONS) while the pool held idle sessions, till their TTL."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20, max_sessions=3)
    prefix = list(range(100, 170))  # past FORK_MIN_SHARED

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        outsider = await client.open_session()  # another client's: the pool may not take it
        for prompt in (prefix + [1], [7, 8, 9]):
            await collect(Generation(pool, prompt, GREEDY))
        assert len(await client.list_sessions()) == 3  # the server is full
        forking = Generation(pool, prefix + [2], GREEDY)  # would fork: lent the parent
        forked = await collect(forking)
        assert forking.cached_tokens >= len(prefix)  # the prefix was not prefilled again
        got = await collect(Generation(pool, [20, 21, 22], GREEDY))  # shares nothing
        assert pool.num_sessions == 2 and len(await client.list_sessions()) == 3
        await outsider.close()  # room for the references, each from a fresh session
        for result, prompt in ((got, [20, 21, 22]), (forked, prefix + [2])):
            reference = SessionPool(client, 1)
            try:
                want = await collect(Generation(reference, prompt, GREEDY))
            finally:
                await reference.close()
            assert [t.token_id for t in result.choices[0].tokens] == [
                t.token_id for t in want.choices[0].tokens
            ]

    run_with_pool(server.target, test)


def test_siblings_forking_one_session_on_a_full_server_each_get_one(
    tiny_llama_dir: Any, server_factory: Any, llama_server: Any
) -> None:
    """Two prompts of one batch fork the same idle session while the server is full: the
    first refusal found the parent still being forked by the other and answered 429,
    though the pool held another idle session. One is lent the parent, the other that
    idle session."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20, max_sessions=2)
    prefix = list(range(100, 170))
    prompts = [prefix + [2], prefix + [3]]

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> list[list[int]]:
        await collect(Generation(pool, prefix + [1], GREEDY))
        await collect(Generation(pool, [7, 8, 9], GREEDY))  # the server is full
        siblings = [Generation(pool, prompt, GREEDY) for prompt in prompts]
        for generation in siblings:
            generation.has_siblings = True
        results = await asyncio.gather(*(collect(g) for g in siblings))
        assert pool.num_sessions == 2
        return [[t.token_id for t in r.choices[0].tokens] for r in results]

    got = run_with_pool(server.target, test)
    want = [
        run_with_pool(llama_server.target, lambda pool, _c, p=p: _tokens_of(pool, p))
        for p in prompts
    ]
    assert got == want


async def _tokens_of(pool: SessionPool, prompt: list[int]) -> list[int]:
    result = await collect(Generation(pool, prompt, GREEDY))
    return [t.token_id for t in result.choices[0].tokens]


def test_the_generation_prompt_is_what_the_template_adds_to_open_the_reply(
    llama_server: Any,
) -> None:
    """The pool's ``prompt_tail`` for chat: the tokens of the assistant turn's opening,
    measured once per set of template variables."""
    probe = [{"role": "user", "content": "x"}]
    with SalienceClient(llama_server.target) as client:
        opened = client.tokenize_chat(probe, add_generation_prompt=True)
        closed = client.tokenize_chat(probe, add_generation_prompt=False)
        opening = client.tokenize("<|im_start|>assistant\n")  # the tiny model's template
    assert opened == closed + opening

    async def main() -> list[int]:
        backend = Backend(ShimConfig(target=llama_server.target))
        try:
            return [
                await backend.generation_prompt_length(RenderOptions()),
                await backend.generation_prompt_length(RenderOptions()),  # measured before
                await backend.generation_prompt_length(RenderOptions(add_generation_prompt=False)),
            ]
        finally:
            await backend.close()

    assert asyncio.run(main()) == [len(opening), len(opening), 0]
