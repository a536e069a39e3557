"""Prefix reuse: the shim's session pool against a real server, and a 20-turn chat through
the openai SDK that pays each turn only for its new tokens."""

from __future__ import annotations

import asyncio
from typing import Any

from salience_client import AsyncSalienceClient, SalienceClient
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.generation import Generation, collect
from salience_server.http.sessions_pool import SessionPool
from tests.pool_support import GREEDY, run_with_pool, wait_for_sessions
from tests.shim_support import RunningShim

PROMPT = list(range(40, 60))


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

    run_with_pool(llama_server.target, test)


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

    run_with_pool(llama_server.target, test)


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

    run_with_pool(llama_server.target, test, fork_min_discard=16)


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
        await wait_for_sessions(client, 3)
        assert sorted(s.length for s in await client.list_sessions()) == [85, 85, 90]

    run_with_pool(llama_server.target, test)


def test_requests_forking_a_lost_session_together_all_succeed(llama_server: Any) -> None:
    """The server lost the pooled session holding a long prefix (its TTL passed, it
    restarted) and requests over that prefix arrive together: each fork's failover
    replayed the parent over the others' replays, and two to four of six failed (409
    "offset past the end", SESSION_BUSY, REPLAY_FAILED). Each now equals the same
    request alone on a fresh session."""
    long_prompt = list(range(40, 120))

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        await collect(Generation(pool, long_prompt, DecodeOptions(max_tokens=0)))
        for round_index in range(2):
            for info in await client.list_sessions():
                await (await client.session(info.session_id)).close()
            prompts = [long_prompt + [round_index, turn] for turn in range(6)]
            results = await asyncio.gather(*(collect(Generation(pool, p, GREEDY)) for p in prompts))
            for prompt, result in zip(prompts, results, strict=True):
                alone = await collect(Generation(SessionPool(client, 1), prompt, GREEDY))
                assert [t.token_id for t in result.choices[0].tokens] == [
                    t.token_id for t in alone.choices[0].tokens
                ]

    run_with_pool(llama_server.target, test)


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

    run_with_pool(llama_server.target, test)


def test_n_choices_over_a_held_prompt_count_its_last_token_as_fed_again(
    llama_server: Any,
) -> None:
    """A prompt the pool holds whole: a lone call feeds its last token again (for its
    logits) and counts the rest as cached; n > 1 choices each do too, but counted the
    whole prompt (their prefill's Done, which fed nothing)."""

    async def test(pool: SessionPool, client: AsyncSalienceClient) -> None:
        await collect(Generation(pool, PROMPT, GREEDY))
        alone = await collect(Generation(pool, PROMPT, GREEDY))
        assert alone.cached_tokens == len(PROMPT) - 1
        options = DecodeOptions(max_tokens=4, temperature=1.0, seed=3)
        for _ in range(2):  # held with its decoded tokens, then exactly
            choices = await collect(Generation(pool, PROMPT, options, n=2))
            assert choices.cached_tokens == alone.cached_tokens
        scoring = await collect(Generation(pool, PROMPT, DecodeOptions(max_tokens=0), n=2))
        assert scoring.cached_tokens == len(PROMPT)  # nothing fed again: nothing decoded

    run_with_pool(llama_server.target, test)


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

    run_with_pool(llama_server.target, test)
