"""vLLM's ``truncate_prompt_tokens`` in Completions and Chat Completions: only the
prompt's last k tokens are sent (it was kept as an unknown field and ignored: the whole
prompt ran, or failed for the context). Oracle: the same request sent as those last k
token ids, through the openai SDK against the tiny Llama (one token per byte)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from salience_server.http.errors import ApiError
from salience_server.http.truncation import last_tokens
from tests.shim_support import RunningShim, start_shim
from tests.tiny_models import with_special_tokens_around_text

PROMPT = "one fish, two fish, red fish, blue fish"


def _complete(shim: RunningShim, model: str, prompt: str | list[int], **extra: object):
    return shim.client().completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=1, extra_body=extra
    )


def test_a_completion_runs_on_the_prompts_last_tokens(shim: RunningShim, model: str) -> None:
    whole = _complete(shim, model, PROMPT, return_token_ids=True)
    ids = whole.choices[0].prompt_token_ids
    cut = _complete(shim, model, PROMPT, truncate_prompt_tokens=9, echo=True)
    want = _complete(shim, model, ids[-9:])
    assert cut.usage.prompt_tokens == 9
    assert cut.choices[0].text == PROMPT[-9:] + want.choices[0].text  # echo: what was sent
    assert cut.choices[0].logprobs.token_logprobs[9:] == pytest.approx(
        want.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    longer = _complete(shim, model, PROMPT, truncate_prompt_tokens=1000)
    assert (
        longer.usage.prompt_tokens == len(ids) and longer.choices[0].text == whole.choices[0].text
    )
    context = _complete(shim, model, PROMPT, truncate_prompt_tokens=-1)
    assert context.choices[0].text == whole.choices[0].text


def test_a_chat_runs_on_the_rendered_prompts_last_tokens(shim: RunningShim, model: str) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    client = shim.client()
    whole = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids = whole.prompt_token_ids
    cut = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"truncate_prompt_tokens": 12, "return_token_ids": True},
    )
    assert cut.usage.prompt_tokens == 12 and cut.prompt_token_ids == ids[-12:]
    want = _complete(shim, model, ids[-12:])
    assert cut.choices[0].message.content == want.choices[0].text


def test_zero_and_negative_are_refused(shim: RunningShim, model: str) -> None:
    for keep in (0, -2):
        with pytest.raises(openai.BadRequestError) as caught:
            _complete(shim, model, PROMPT, truncate_prompt_tokens=keep)
        assert caught.value.body["param"] == "truncate_prompt_tokens"


def test_a_cut_inside_an_image_is_refused() -> None:
    """An image is a run of one negative marker in the shim's prompt ids."""
    ids = [5, 6, -9, -9, -9, 7]
    assert last_tokens(ids, 4, 100) == [-9, -9, -9, 7]  # the whole image
    assert last_tokens(ids, 1, 100) == [7]
    with pytest.raises(ApiError, match="image"):
        last_tokens(ids, 3, 100)


def test_a_prompt_longer_than_the_context_could_hold_is_cut_rather_than_refused(
    shim: RunningShim, model: str
) -> None:
    """A prompt of more characters than any 512 tokens span (256 each) was refused as
    too long before it was tokenized, ``truncate_prompt_tokens`` or not (Embeddings
    took it). Its last tokens are those of its end alone: the oracle."""
    long = "x" * (512 * 256 + 1) + PROMPT
    cut = _complete(shim, model, long, truncate_prompt_tokens=9)
    want = _complete(shim, model, PROMPT, truncate_prompt_tokens=9)
    assert cut.usage.prompt_tokens == 9 and cut.choices[0].text == want.choices[0].text
    client = shim.client()
    replies = [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
            extra_body={"truncate_prompt_tokens": 12, "return_token_ids": True},
        )
        for content in (long, PROMPT)
    ]
    assert replies[0].prompt_token_ids == replies[1].prompt_token_ids
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_a_cut_chat_sent_again_leaves_other_conversations_sessions(
    llama_server: Any, model: str
) -> None:
    """A cut chat prompt sent again (regenerated) continues its session. Its tail (the
    generation prompt) was counted from the whole rendering's length, below zero, so the
    pool took each resend for a branch off the session's history: it forked it, closing
    the least recently used idle session, another conversation's, with a full pool.
    Oracle: that conversation's next request, as when the prompt is not cut."""
    shim = start_shim(llama_server.target, max_pooled_sessions=2)
    try:
        client = shim.client()
        system = {"role": "system", "content": "Answer briefly about the sea. " * 4}
        cut = [system, {"role": "user", "content": PROMPT}]
        other = [{"role": "user", "content": "something else entirely " * 4}]

        def cached(messages: list[dict[str, Any]], **extra: Any) -> tuple[int, int]:
            usage = client.chat.completions.create(
                model=model, messages=messages, max_tokens=2, temperature=0, extra_body=extra
            ).usage
            return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

        cached(other)
        assert cached(cut, truncate_prompt_tokens=100) == (0, 100)
        for _ in range(2):
            assert cached(cut, truncate_prompt_tokens=100) == (99, 100)
        held, length = cached(other)
        assert held == length - 1
    finally:
        shim.stop()


def test_the_special_tokens_a_text_gets_stay_when_it_is_cut(
    tiny_llama_dir, server_factory, tmp_path
) -> None:
    """vLLM cuts a text in its tokenizer, which keeps the special tokens it adds: a BOS,
    the last tokens, an EOS where the tokenizer adds one, k in all. They were cut away
    with the rest (a Llama 3 reads a text without its BOS quite otherwise), in
    Completions and Embeddings; token ids sent as such are cut as they are. Oracle: the
    tokenizer's own truncation, and the same call sent as the ids it keeps."""
    model_dir = with_special_tokens_around_text(
        tiny_llama_dir, tmp_path / "model", "<s> $A <|im_end|>"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    kept = tokenizer(PROMPT, truncation=True, max_length=9)["input_ids"]
    assert len(kept) == 9 and kept[0] == tokenizer.bos_token_id
    shim = start_shim(server_factory(model_dir).target)
    try:
        model = shim.client().models.list().data[0].id
        cut = _complete(shim, model, PROMPT, truncate_prompt_tokens=9, return_token_ids=True)
        want = _complete(shim, model, kept)
        assert cut.choices[0].prompt_token_ids == kept
        assert cut.choices[0].text == want.choices[0].text
        assert cut.choices[0].logprobs.token_logprobs == pytest.approx(
            want.choices[0].logprobs.token_logprobs, abs=1e-4
        )
        embed = shim.client().embeddings.create
        cut_vector = embed(model=model, input=PROMPT, extra_body={"truncate_prompt_tokens": 9})
        want_vector = embed(model=model, input=[kept])
        assert cut_vector.usage.prompt_tokens == 9
        assert cut_vector.data[0].embedding == pytest.approx(want_vector.data[0].embedding)
        ids = tokenizer(PROMPT)["input_ids"]
        as_ids = embed(model=model, input=[ids], extra_body={"truncate_prompt_tokens": 9})
        last = embed(model=model, input=[ids[-9:]])
        assert as_ids.data[0].embedding == pytest.approx(last.data[0].embedding)
    finally:
        shim.stop()
