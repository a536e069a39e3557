"""Session results against one plain transformers forward pass / generate (the oracles)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from salience_client.pb import salience_pb2 as pb
from salience_server.engine.token_bytes import incomplete_tail
from tests.helpers import U32_MAX, generate, open_session, reference_greedy, reference_logprobs
from tests.tiny_models import reference_model

TOLERANCE = 1e-4


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_appends_in_several_calls_equal_one_forward_pass(
    architecture: str, tiny_llama_dir: Path, tiny_qwen3_dir: Path, server_factory
) -> None:
    model_dir = tiny_llama_dir if architecture == "llama" else tiny_qwen3_dir
    server = server_factory(model_dir, block_size=4, kv_cache_bytes=4 << 20, max_batch_tokens=16)
    rng = random.Random(7)
    token_ids = [rng.randrange(256) for _ in range(90)]
    oracle = reference_logprobs(reference_model(model_dir), token_ids)
    session_id = open_session(server.stub)
    events = []
    cuts = [0, 1, 9, 10, 37, 64, 90]  # chunks of 1, 8, 1, 27 (> max_batch_tokens), 27, 26
    for start, end in zip(cuts, cuts[1:], strict=False):
        tokens, done = generate(
            server.stub,
            session_id,
            append_tokens=token_ids[start:end],
            offset=start,
            logprobs_ranges=[(start, U32_MAX)],
            logprob_top_k=3,
        )
        assert done.total_tokens == end and done.finish_reason == 5  # PREFILL
        events.extend(tokens)
    assert [e.position for e in events] == list(range(90))
    assert [e.id for e in events] == token_ids
    assert events[0].sampled_logprob == 0.0 and events[0].rank == 0 and not events[0].top_logprobs
    got = torch.tensor([e.sampled_logprob for e in events[1:]])
    want = oracle[torch.arange(89), torch.tensor(token_ids[1:])]
    assert (got - want).abs().max().item() < TOLERANCE


def test_top_logprobs_and_ranks_equal_topk_of_log_softmax(
    tiny_llama_dir: Path, llama_server
) -> None:
    rng = random.Random(3)
    token_ids = [rng.randrange(256) for _ in range(40)]
    oracle = reference_logprobs(reference_model(tiny_llama_dir), token_ids)
    session_id = open_session(llama_server.stub)
    tokens, _ = generate(
        llama_server.stub,
        session_id,
        append_tokens=token_ids,
        logprobs_ranges=[(5, 12), (30, 35)],
        logprob_top_k=5,
    )
    assert [t.position for t in tokens] == [*range(5, 12), *range(30, 35)]
    for token in tokens:
        row = oracle[token.position - 1]
        values, indices = torch.topk(row, 5)
        assert [t.token_id for t in token.top_logprobs] == indices.tolist()
        assert torch.allclose(
            torch.tensor([t.logprob for t in token.top_logprobs]), values, atol=TOLERANCE
        )
        assert token.rank == int((row > row[token.id]).sum()) + 1


def test_first_appended_position_is_exact_after_prefill_only_call(
    tiny_llama_dir: Path, llama_server
) -> None:
    token_ids = list(range(60, 80))
    oracle = reference_logprobs(reference_model(tiny_llama_dir), token_ids)
    session_id = open_session(llama_server.stub)
    generate(llama_server.stub, session_id, append_tokens=token_ids[:10])
    tokens, done = generate(
        llama_server.stub,
        session_id,
        append_tokens=token_ids[10:],
        offset=10,
        logprobs_ranges=[(10, 11)],
    )
    assert done.cached_tokens == 9  # the last token is fed again for the distribution at 9
    assert [t.position for t in tokens] == [10]
    assert abs(tokens[0].sampled_logprob - oracle[9, token_ids[10]].item()) < TOLERANCE


def test_greedy_decode_equals_transformers_generate(tiny_llama_dir: Path, llama_server) -> None:
    prompt = [5, 17, 99, 3, 200, 41, 7]
    want = reference_greedy(reference_model(tiny_llama_dir), prompt, 40)
    session_id = open_session(llama_server.stub)
    tokens, done = generate(llama_server.stub, session_id, append_tokens=prompt, max_tokens=40)
    got = [t.id for t in tokens]
    assert got == want
    assert done.total_tokens == len(prompt) + len(got)
    assert all(not t.is_prefill for t in tokens)


def test_decoded_logprobs_equal_forward_pass_over_the_result(
    tiny_llama_dir: Path, llama_server
) -> None:
    prompt = [11, 12, 13, 14]
    session_id = open_session(llama_server.stub)
    tokens, _ = generate(
        llama_server.stub, session_id, append_tokens=prompt, max_tokens=12, temperature=1.0, seed=5
    )
    sequence = prompt + [t.id for t in tokens]
    oracle = reference_logprobs(reference_model(tiny_llama_dir), sequence)
    for token in tokens:
        assert abs(token.sampled_logprob - oracle[token.position - 1, token.id].item()) < TOLERANCE


def test_rewind_equals_fresh_session(tiny_llama_dir: Path, llama_server) -> None:
    stub = llama_server.stub
    first = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10, 20, 30]
    replacement = [100, 101, 102, 103, 104]
    rewound = open_session(stub)
    generate(stub, rewound, append_tokens=first, max_tokens=6)
    tokens_a, done_a = generate(
        stub,
        rewound,
        append_tokens=replacement,
        offset=7,
        truncating=True,
        max_tokens=10,
        logprobs_ranges=[(7, U32_MAX)],
    )
    fresh = open_session(stub)
    tokens_b, done_b = generate(
        stub,
        fresh,
        append_tokens=first[:7] + replacement,
        max_tokens=10,
        logprobs_ranges=[(7, U32_MAX)],
    )
    assert [t.id for t in tokens_a] == [t.id for t in tokens_b]
    diffs = [
        abs(a.sampled_logprob - b.sampled_logprob) for a, b in zip(tokens_a, tokens_b, strict=True)
    ]
    assert max(diffs) < TOLERANCE
    assert done_a.total_tokens == done_b.total_tokens


def test_seeded_sampling_is_reproducible(llama_server) -> None:
    stub = llama_server.stub
    results = []
    for _ in range(2):
        session_id = open_session(stub)
        tokens, _ = generate(
            stub,
            session_id,
            append_tokens=[1, 2, 3],
            max_tokens=20,
            temperature=0.9,
            top_p=0.9,
            top_k=50,
            seed=1234,
        )
        results.append([t.id for t in tokens])
    assert results[0] == results[1]


@pytest.mark.skipif("not __import__('tests.conftest').conftest.default_model_available()")
def test_default_model_chat_greedy_equals_transformers(default_server) -> None:
    from salience_client.pb import salience_pb2 as pb

    stub = default_server.stub
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Name three colors.")])
    prompt = list(
        stub.Tokenize(pb.TokenizeRequest(messages=messages, add_generation_prompt=True)).token_ids
    )
    session_id = open_session(stub)
    tokens, done = generate(stub, session_id, append_tokens=prompt, max_tokens=24, return_text=True)
    loaded = default_server.engine.loaded
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    want = reference_greedy(reference, prompt, 24)
    got = [t.id for t in tokens]
    assert got == want and len(got) > 3
    text = "".join(t.text for t in tokens)
    assert text == loaded.tokenizer.decode(got, skip_special_tokens=True)


def test_ignore_eos_decodes_exactly_max_tokens_along_the_argmax_chain(
    tiny_llama_dir: Path, llama_server
) -> None:
    model = reference_model(tiny_llama_dir)
    sequence = [258, 7, 258, 9]  # the EOS id in the prompt too: only decoding may stop
    session_id = open_session(llama_server.stub)
    tokens, done = generate(
        llama_server.stub, session_id, append_tokens=sequence, max_tokens=30, ignore_eos=True
    )
    want = []
    with torch.no_grad():
        for _ in range(30):
            next_id = int(model(torch.tensor([sequence + want])).logits[0, -1].argmax())
            want.append(next_id)
    assert [t.id for t in tokens] == want
    assert done.completion_tokens == 30 and done.finish_reason == 3  # LENGTH


@pytest.mark.parametrize("stops", [[], ["\x00\x00\x00"]], ids=["plain", "stop-strings"])
def test_streamed_text_joins_to_the_decoded_tokens(llama_server, stops) -> None:
    """The token texts of a call join to the decode of its tokens, even when it ends
    inside a multibyte character (its bytes were held back for good: the text lost
    them). Byte tokens sampled at temperature 1 end mid-character about half the time;
    stop strings that never match take the engine's text path."""
    stub = llama_server.stub
    for seed in range(12):
        session_id = open_session(stub)
        tokens, _ = generate(
            stub,
            session_id,
            append_tokens=[5, 6, 7],
            max_tokens=5,
            temperature=1.0,
            seed=seed,
            ignore_eos=True,
            return_text=True,
            stop_strings=stops,
        )
        ids = [t.id for t in tokens]
        decoded = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text
        assert "".join(t.text for t in tokens) == decoded, (seed, ids)


def test_a_character_cut_by_a_calls_end_comes_whole_in_the_next_call(llama_server) -> None:
    """A session decoded in two calls, the first ending inside a multibyte character:
    where the second call's tokens complete it, its texts begin with that character
    whole (its completing token gave no text, U+FFFD in the context standing for it: the
    character was lost); where they do not, the U+FFFD was the first call's text and is
    not sent again."""
    stub = llama_server.stub
    num_cut = num_completed = 0
    for seed in range(16):
        session_id = open_session(stub)
        options = dict(temperature=1.0, seed=seed, ignore_eos=True, return_text=True)
        first, done = generate(stub, session_id, append_tokens=[5, 6, 7], max_tokens=4, **options)
        second, _ = generate(stub, session_id, offset=done.total_tokens, max_tokens=4, **options)
        ids = [5, 6, 7] + [t.id for t in first]
        decoded = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, return_token_bytes=True))
        is_cut = incomplete_tail(b"".join(decoded.token_bytes)) > 0
        num_cut += is_cut
        whole = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids + [t.id for t in second])).text
        text = decoded.text
        completed = is_cut and whole[len(text) - 1 : len(text)] != "\ufffd"
        num_completed += completed
        before = text[: len(text) - completed]  # the U+FFFD standing for the cut
        assert "".join(t.text for t in second) == whole[len(before) :], seed
    assert num_cut > num_completed > 0  # some calls completed the cut character, some not
