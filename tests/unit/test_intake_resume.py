"""A call's intake where it reads text or a grammar: stop strings, constraints and
seeds, for a fresh call and for a resumed stream (``decode_start`` before the prompt's
end: the broken call's decoded tokens are read again, so that the call goes on as the
unbroken one would). Real tokenizer (byte-level) and grammar compiler; no model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from salience_server.engine import sampler
from salience_server.engine.constraints import ConstraintCompiler, ConstraintSpec, ThinkingMatcher
from salience_server.engine.intake import Intake
from salience_server.engine.request import FinishReason, GenerateParams, Request, SamplingParams
from salience_server.engine.session import Session
from salience_server.engine.validation import Limits
from tests.session_support import computed, make_table
from tests.tiny_models import build_tokenizer

TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)
SPECIAL = TOKENIZER.convert_tokens_to_ids("<|im_start|>")
"""A special token: it has no text (``keep_special_tokens`` off)."""
CPU = torch.device("cpu")


def ids(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    return ConstraintCompiler(TOKENIZER, VOCAB, [TOKENIZER.eos_token_id])


def resumed(
    compiler: ConstraintCompiler, prompt: list[int], decoded: list[int], **options: Any
) -> tuple[Request, Session]:
    """A call resuming a stream broken after ``decoded`` (its tokens committed, with KV):
    nothing appended, ``decode_start`` where ``decoded`` begins."""
    table = make_table()
    session = computed(table, table.open("s"), len(prompt) + len(decoded))
    session.token_ids = prompt + decoded
    options.setdefault("max_tokens", 16)
    params = GenerateParams("s", offset=session.length, decode_start=len(prompt), **options)
    intake = Intake(
        compiler, table, table.runner, TOKENIZER, VOCAB, {1}, False, Limits(max_stop_strings=4)
    )
    intake.check(params, session, None)
    return intake.accept(params, session, lambda event: None, None), session


def next_text(request: Request, token_ids: list[int]) -> tuple[str, bool]:
    """The text released and whether a stop string matched, decoding ``token_ids`` next
    (as ``outputs`` reads each decoded token)."""
    released, matched = "", False
    for token_id in token_ids:
        assert request.detokenizer is not None
        text, matched = request.stop_matcher.push(request.detokenizer.push(token_id))
        released += text
    return released, matched


def test_a_call_without_stop_strings_reads_no_text(compiler: ConstraintCompiler) -> None:
    request, _ = resumed(compiler, ids("hi"), ids("abc"))
    assert request.detokenizer is None and request.finish_reason is None


def test_a_fresh_calls_first_token_renders_after_the_sessions_text(
    compiler: ConstraintCompiler,
) -> None:
    """The detokenizer's context is the session's tail: a character the prompt leaves
    cut (é's first byte) comes whole with the decoded byte that completes it."""
    first, second = ids("é")
    request, _ = resumed(compiler, ids("hi") + [first], [], stop_strings=["zz"])
    assert next_text(request, [second]) == ("é", False)


def test_a_stop_string_the_broken_call_had_decoded_ends_the_call_at_once(
    compiler: ConstraintCompiler,
) -> None:
    """The broken call ended there (its Done was lost): nothing is fed or decoded."""
    request, session = resumed(compiler, ids("hi"), ids("xbcd"), stop_strings=["bc"])
    assert request.finish_reason == FinishReason.STOP_STRING and request.is_finished
    assert session.num_computed == session.length == 6


def test_before_min_tokens_no_stop_string_matches_as_in_the_broken_call(
    compiler: ConstraintCompiler,
) -> None:
    """min_tokens counts from decode_start: "c" is the third decoded token."""
    request, _ = resumed(compiler, ids("hi"), ids("xbc"), stop_strings=["c"], min_tokens=4)
    assert request.finish_reason is None
    request, _ = resumed(compiler, ids("hi"), ids("xbc"), stop_strings=["c"], min_tokens=3)
    assert request.finish_reason == FinishReason.STOP_STRING


def test_min_tokens_counts_the_decoded_tokens_too_far_back_to_be_read(
    compiler: ConstraintCompiler,
) -> None:
    """Only the last tokens are read again (a 2-byte stop string: 4), but the 6 before
    them count toward min_tokens: "bc" begins at the ninth (text released before
    min_tokens is never held back for a stop string, as in the broken call)."""
    decoded = ids("zzzzzzzzbc")
    request, _ = resumed(compiler, ids("hi"), decoded, stop_strings=["bc"], min_tokens=9)
    assert request.finish_reason == FinishReason.STOP_STRING
    request, _ = resumed(compiler, ids("hi"), decoded, stop_strings=["bc"], min_tokens=10)
    assert request.finish_reason is None


def test_text_held_back_for_a_stop_string_goes_on_across_the_break(
    compiler: ConstraintCompiler,
) -> None:
    """The broken call held "a" back (it may begin "ab"), skipped special tokens
    after it: the resumed call's "b" completes the match."""
    decoded = ids("xya") + [SPECIAL, SPECIAL]
    request, _ = resumed(compiler, ids("hi"), decoded, stop_strings=["ab"])
    assert request.finish_reason is None
    assert next_text(request, ids("b")) == ("", True)


def test_the_stop_string_reported_is_the_first_the_decoded_tokens_hold(
    compiler: ConstraintCompiler,
) -> None:
    request, _ = resumed(compiler, ids("hi"), ids("xbcde"), stop_strings=["de", "bc"])
    assert request.done_event().stop_string == "bc"


def test_the_longest_stop_string_sets_how_far_back_the_tokens_are_read(
    compiler: ConstraintCompiler,
) -> None:
    """Two tokens a byte (special tokens between may hold none): "abc", held back for
    "abcd", lies within the last 8 tokens, whatever the shorter stop string."""
    decoded = ids("xabc") + [SPECIAL] * 5
    request, _ = resumed(compiler, ids("hi"), decoded, stop_strings=["z", "abcd"])
    assert request.finish_reason is None
    assert next_text(request, ids("d")) == ("", True)


def test_the_prompts_text_never_matches_a_stop_string(compiler: ConstraintCompiler) -> None:
    """Stop strings match the text decoded in the call (SPEC 2.1), also where the
    tokens read again would reach into the prompt."""
    request, _ = resumed(compiler, ids("hib"), ids("c"), stop_strings=["bc"])
    assert request.finish_reason is None


def test_the_first_token_read_again_renders_after_the_prompts_text(
    compiler: ConstraintCompiler,
) -> None:
    """The prompt ends inside "€" (its first two bytes): the decoded byte completing it
    renders whole from the prompt's tail, and "€!" is found in the decoded text."""
    euro = ids("€")
    decoded = euro[2:] + ids("!" + "y" * 14)
    request, _ = resumed(compiler, euro[:2], decoded, stop_strings=["€!", "q" * 20])
    assert request.done_event().stop_string == "€!"


def test_text_the_broken_call_released_is_not_released_again(
    compiler: ConstraintCompiler,
) -> None:
    request, _ = resumed(compiler, ids("hi"), ids("xyz"), stop_strings=["zq"])
    assert next_text(request, ids("w")) == ("zw", False)  # "z" was held back, not "xy"


def test_a_grammar_resumed_midway_goes_on_from_the_decoded_tokens(
    compiler: ConstraintCompiler,
) -> None:
    constraint = compiler.compile(ConstraintSpec("regex", "abc"))
    request, _ = resumed(compiler, ids("hi"), ids("ab"), constraint=constraint)
    assert request.finish_reason is None and not request.matcher.is_complete
    request.matcher.consume(ids("c")[0])
    assert request.matcher.is_complete


def test_a_grammar_the_decoded_tokens_complete_ends_the_call_at_once(
    compiler: ConstraintCompiler,
) -> None:
    """As a stop string they hold does: nothing is fed again, no token decoded, and
    the whole prompt counts as cached."""
    constraint = compiler.compile(ConstraintSpec("regex", "abc"))
    request, session = resumed(compiler, ids("hi"), ids("abc"), constraint=constraint)
    assert request.finish_reason == FinishReason.STOP and request.is_finished
    assert (session.num_computed, request.num_cached) == (5, 5)


def test_a_stop_string_that_ended_the_broken_call_is_its_reason_over_the_grammar(
    compiler: ConstraintCompiler,
) -> None:
    constraint = compiler.compile(ConstraintSpec("regex", "abc"))
    request, _ = resumed(
        compiler, ids("hi"), ids("abc"), constraint=constraint, stop_strings=["bc"]
    )
    assert request.finish_reason == FinishReason.STOP_STRING


def test_a_grammar_after_free_thinking_reads_the_thinking_then_the_answer(
    compiler: ConstraintCompiler,
) -> None:
    end = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
    constraint = compiler.compile(ConstraintSpec("regex", "abc"))
    decoded = ids("hmm") + [end] + ids("abc")
    request, _ = resumed(compiler, ids("hi"), decoded, constraint=constraint, thinking=(None, end))
    assert isinstance(request.matcher, ThinkingMatcher)
    assert request.finish_reason == FinishReason.STOP


def test_a_fresh_constrained_call_starts_its_grammar_at_the_beginning(
    compiler: ConstraintCompiler,
) -> None:
    constraint = compiler.compile(ConstraintSpec("regex", "abc"))
    request, _ = resumed(compiler, ids("hiabc"), [], constraint=constraint)
    assert request.finish_reason is None and not request.matcher.is_complete


def test_a_resumed_seeded_call_draws_on_from_where_the_broken_call_was(
    compiler: ConstraintCompiler,
) -> None:
    """The broken call drew one uniform per decoded token: the seed goes on from there,
    so the resumed call samples what the unbroken one would have."""
    sampling = SamplingParams(temperature=1.0, seed=7)
    request, _ = resumed(compiler, ids("hi"), ids("abc"), sampling=sampling)
    expected = sampler.make_generator(sampling, CPU)
    assert expected is not None
    sampler.spend_uniforms(expected, 3)
    assert request.generator.get_state().equal(expected.get_state())
    fresh, _ = resumed(compiler, ids("hiabc"), [], sampling=sampling)
    unspent = sampler.make_generator(sampling, CPU)
    assert unspent is not None and fresh.generator.get_state().equal(unspent.get_state())


def test_a_greedy_or_unseeded_call_has_no_generator_of_its_own(
    compiler: ConstraintCompiler,
) -> None:
    for sampling in (SamplingParams(seed=7), SamplingParams(temperature=1.0)):
        request, _ = resumed(compiler, ids("hi"), ids("abc"), sampling=sampling)
        assert request.generator is None
