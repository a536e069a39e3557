"""Prefix reuse: the shim's session pool against a real server, and a 20-turn chat through
the openai SDK that pays each turn only for its new tokens."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from salience_client import AsyncSalienceClient, SalienceClient, TokenEvent
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.generation import Generation, collect
from salience_server.http.sessions_pool import SessionPool
from tests.shim_support import RunningShim

PROMPT = list(range(40, 60))
GREEDY = DecodeOptions(max_tokens=4, temperature=0.0)


def _run(target: str, test: Any, **pool_options: Any) -> Any:
    """Runs ``test(pool, client)`` in a fresh event loop with a pool on ``target``."""

    async def main() -> Any:
        async with AsyncSalienceClient(target, timeout=30) as client:
            for info in await client.list_sessions():  # what earlier tests left
                await (await client.session(info.session_id)).close()
            pool = SessionPool(client, **{"max_sessions": 8, **pool_options})
            try:
                return await test(pool, client)
            finally:
                await pool.close()

    return asyncio.run(main())


async def _wait_for_sessions(client: AsyncSalienceClient, count: int) -> None:
    """Until the server holds ``count`` sessions (the pool closes the ones it lets go in
    the background), for at most 10 s."""
    deadline = time.monotonic() + 10
    while len(sessions := await client.list_sessions()) != count:
        assert time.monotonic() < deadline, (
            f"the server holds {len(sessions)} sessions after 10 s, not {count}: "
            f"{[(s.session_id, s.length) for s in sessions]}"
        )
        await asyncio.sleep(0.01)


def test_the_longest_shared_prefix_is_lent_and_never_twice(llama_server: Any) -> None:
    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        first = await pool.acquire(PROMPT)
        assert first.shared == 0
        pool.release(first, PROMPT)
        other = await pool.acquire([1, 2, 3])  # shares nothing: a session of its own
        assert other.session.session_id != first.session.session_id
        pool.release(other, [1, 2, 3])
        again = await pool.acquire(PROMPT + [7, 8])
        assert again.session.session_id == first.session.session_id and again.shared == 20
        meanwhile = await pool.acquire(PROMPT + [7, 8])  # the best one is lent: not it
        assert meanwhile.session.session_id not in (
            first.session.session_id,
            other.session.session_id,
        )
        assert meanwhile.shared == 0 and pool.num_leased == 2
        assert (await pool.acquire(PROMPT, reuse=False)).shared == 0

    _run(llama_server.target, test)


def test_generations_continue_what_the_pool_knows(llama_server: Any) -> None:
    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        first = await collect(Generation(pool, PROMPT, GREEDY))
        decoded = [t.token_id for t in first.choices[0].tokens]
        follow_up = PROMPT + decoded + [9, 9]
        second = await collect(Generation(pool, follow_up, GREEDY))
        assert pool.num_sessions == 1 and pool.num_leased == 0
        # All but the last decoded token (never fed to the model) was in the KV.
        assert second.cached_tokens == len(PROMPT) + len(decoded) - 1
        (session,) = await client.list_sessions()
        assert session.length == len(follow_up) + 4
        # The server lost the session (expired, say): the next call starts afresh.
        await client.open_session()  # one the pool does not know; left alone
        known = pool._entries[0].session
        await known.close()
        third = await collect(Generation(pool, follow_up, GREEDY))
        assert third.cached_tokens == 0
        assert [t.token_id for t in third.choices[0].tokens] == [
            t.token_id for t in second.choices[0].tokens
        ]

    _run(llama_server.target, test)


def test_a_short_match_forks_instead_of_rewinding(llama_server: Any) -> None:
    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        long_history = PROMPT + list(range(100, 140))
        await collect(Generation(pool, long_history, DecodeOptions(max_tokens=0)))
        (parent,) = pool._entries
        branch = await collect(Generation(pool, PROMPT[:10] + [5, 6, 7], GREEDY))
        assert branch.cached_tokens == 10
        assert pool.num_sessions == 2
        lengths = sorted(s.length for s in await client.list_sessions())
        assert lengths == [13 + 4, len(long_history)]  # the long history is intact
        assert parent.token_ids == long_history

    _run(llama_server.target, test, fork_min_discard=16)


def test_concurrent_requests_share_a_long_prefix(llama_server: Any) -> None:
    """Requests arriving together over one long prefix (a system prompt) each get a fork
    of the idle session holding it: it was lent to the first alone, and the others
    prefilled the prefix again. A lone conversation still ends with one session."""
    long_prompt = list(range(40, 120))  # 80 tokens, past FORK_MIN_SHARED

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        await collect(Generation(pool, long_prompt, DecodeOptions(max_tokens=0)))
        (parent,) = pool._entries
        results = await asyncio.gather(
            *(collect(Generation(pool, long_prompt + [turn], GREEDY)) for turn in (1, 2, 3))
        )
        assert [r.cached_tokens for r in results] == [80, 80, 80]
        assert pool.num_sessions == 3 and parent not in pool._entries  # its children hold it
        # One conversation, turn after turn: each turn's fork replaces its parent.
        reply = [t.token_id for t in results[0].choices[0].tokens]
        follow_up = long_prompt + [1] + reply + [9]
        second = await collect(Generation(pool, follow_up, GREEDY))
        assert second.cached_tokens == len(follow_up) - 2  # all but the new and last decoded
        assert pool.num_sessions == 3
        await _wait_for_sessions(client, 3)
        assert sorted(s.length for s in await client.list_sessions()) == [85, 85, 90]

    _run(llama_server.target, test)


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
        await _wait_for_sessions(client, 2)
        assert sorted(s.length for s in await client.list_sessions()) == [85, 85]

    _run(llama_server.target, test, max_sessions=3)


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

    _run(llama_server.target, test, max_sessions=4)


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

    _run(llama_server.target, test, max_sessions=3)


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
        await _wait_for_sessions(client, 2)
        assert len(await client.list_sessions()) == 2

    _run(llama_server.target, test, max_sessions=2)


def test_a_lost_session_lent_to_be_rewound_is_replaced(llama_server: Any) -> None:
    """Replay off and the pool full, a prompt sharing nothing is lent the least recent
    session to rewind; gone from the server (its TTL passed), the request failed 404."""

    async def main() -> None:
        async with AsyncSalienceClient(llama_server.target, timeout=30, replay=False) as client:
            pool = SessionPool(client, max_sessions=1)
            try:
                await collect(Generation(pool, PROMPT, GREEDY))
                want = await collect(Generation(SessionPool(client, 1), [1, 2, 3], GREEDY))
                for info in await client.list_sessions():
                    await (await client.session(info.session_id)).close()
                got = await collect(Generation(pool, [1, 2, 3], GREEDY))
                assert [t.token_id for t in got.choices[0].tokens] == [
                    t.token_id for t in want.choices[0].tokens
                ]
            finally:
                await pool.close()

    asyncio.run(main())


def test_n_choices_share_one_prefill(llama_server: Any) -> None:
    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        options = DecodeOptions(max_tokens=5, temperature=1.0, seed=3)
        result = await collect(Generation(pool, PROMPT, options, n=3))
        assert [c.done.completion_tokens for c in result.choices if c.done] == [5, 5, 5]
        assert len({tuple(t.token_id for t in c.tokens) for c in result.choices}) > 1
        sessions = await client.list_sessions()
        assert sorted(s.length for s in sessions) == [25, 25, 25]
        assert pool.num_sessions == 3 and pool.num_leased == 0

    _run(llama_server.target, test)


def test_a_twenty_turn_chat_pays_only_for_new_tokens(
    default_shim: RunningShim, default_server: Any
) -> None:
    client = default_shim.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Let us talk about the sea. Say something."}]
    previous = None
    with SalienceClient(default_server.target) as grpc_client:
        for turn in range(20):
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=2, temperature=0
            )
            usage = reply.usage
            if previous is not None:
                # New this turn: the end of the last reply's turn and the new user turn;
                # plus the last decoded token, whose KV was never computed.
                new = usage.prompt_tokens - previous.prompt_tokens - previous.completion_tokens
                assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens == new + 1
            assert usage.prompt_tokens == len(grpc_client.tokenize_chat(messages))
            previous = usage
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": f"Tell me more ({turn})."},
            ]


def test_a_retry_right_after_a_stopped_call_waits_for_its_session(llama_server: Any) -> None:
    """A client that stops a stream and sends the request again at once (stop, then
    regenerate) is lent the stopped call's session once it settles: the retry found it
    still lent and prefilled the whole conversation in a fresh session."""

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        await collect(Generation(pool, PROMPT, DecodeOptions(max_tokens=0)))
        lease = await pool.acquire(PROMPT + [7])
        assert lease.shared == len(PROMPT)
        pool.abandon(lease, PROMPT)  # its call ended early: it settles in the background
        retry = await pool.acquire(PROMPT + [7])
        assert retry.session.session_id == lease.session.session_id
        assert retry.shared == len(PROMPT) and pool.num_sessions == 1

    _run(llama_server.target, test)


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

    _run(server.target, test)


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

    got = _run(server.target, test)
    want = [_run(llama_server.target, lambda pool, _c, p=p: _tokens_of(pool, p)) for p in prompts]
    assert got == want


async def _tokens_of(pool: SessionPool, prompt: list[int]) -> list[int]:
    result = await collect(Generation(pool, prompt, GREEDY))
    return [t.token_id for t in result.choices[0].tokens]
