"""Speculation's start-up timing of verification passes (``draft_cost.measure``) stays
within what a session may hold: the KV pool's tokens and the model's positions. Oracle:
greedy decoding without speculation on the same model."""

from __future__ import annotations

from tests.architectures import build_architecture
from tests.helpers import U32_MAX
from tests.integration.test_speculative import BLOCK_SIZE, PROMPT, TOKEN_BYTES, _both, _same


def test_more_drafts_than_the_pool_holds_are_measured_within_it(
    tiny_llama_dir, server_factory
) -> None:
    """--num-speculative-tokens above the pool's tokens: the start-up timing of a
    verification pass of 1 + K rows wrote past the pool (an IndexError's traceback).
    Drafts stay within the pool, and greedy decoding is decoding's without them."""
    options = dict(block_size=BLOCK_SIZE, kv_cache_bytes=10 * BLOCK_SIZE * TOKEN_BYTES)
    plain = server_factory(tiny_llama_dir, **options)
    speculating = server_factory(
        tiny_llama_dir, speculative="ngram", num_speculative_tokens=64, **options
    )
    want, want_done, got, got_done = _both(
        (plain, speculating), PROMPT, max_tokens=40, logprobs_ranges=[(0, U32_MAX)]
    )
    _same(got, want)
    assert got_done.finish_reason == want_done.finish_reason == 4  # CONTEXT, at 40 tokens


def test_a_model_of_learned_positions_measures_drafts_within_them(server_factory, tmp_path) -> None:
    """GPT-2's 512 learned positions: the start-up timing of verification passes after
    512 cached tokens fed positions past them (an IndexError's traceback at start).
    Greedy decoding is decoding's without speculation."""
    model_dir = build_architecture(tmp_path / "gpt2", "gpt2")
    plain = server_factory(model_dir, block_size=BLOCK_SIZE)
    speculating = server_factory(
        model_dir, block_size=BLOCK_SIZE, speculative="ngram", num_speculative_tokens=8
    )
    want, want_done, got, got_done = _both(
        (plain, speculating), PROMPT, max_tokens=20, logprobs_ranges=[(0, U32_MAX)]
    )
    _same(got, want)
    assert got_done.total_tokens == want_done.total_tokens
