"""What RL and evaluation pipelines need to read tokens back exactly, as vLLM gives it:
``return_token_ids``, ``return_tokens_as_token_ids`` (logprobs name each token
``token_id:N``), ``include_stop_str_in_output`` (the text keeps the stop string or stop
token that ended it) and ``prompt_logprobs``, all taken and ignored before, and chat
logprobs holding the end-of-turn token.

Oracles: the gRPC path's token ids for the same prompt ids, and the same greedy reply
without a stop string, on the tiny Llama (one token per byte)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from salience_client import END, SalienceClient
from tests.shim_support import RunningShim

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hi"}]


def _prompt_ids(target: str) -> tuple[list[int], list[int]]:
    """The token ids of ``PROMPT`` (completions) and of ``MESSAGES`` (chat, rendered)."""
    with SalienceClient(target) as client:
        return (
            client.tokenize(PROMPT, add_special_tokens=True),
            client.tokenize_chat(MESSAGES, add_generation_prompt=True),
        )


def _completion_text(shim: RunningShim, model: str, stream: bool = False, **fields: Any) -> str:
    """The text of the first choice of a greedy completion of ``PROMPT``, streamed or
    whole."""
    reply = shim.client().completions.create(
        model=model, prompt=PROMPT, temperature=0, stream=stream, **fields
    )
    if stream:
        return "".join(c.choices[0].text for c in reply if c.choices)
    return str(reply.choices[0].text)


def _grpc_greedy(target: str, token_ids: list[int], count: int) -> list[Any]:
    with SalienceClient(target) as client, client.open_session() as session:
        *tokens, _ = session.generate(
            token_ids, max_tokens=count, logprobs_ranges=[(len(token_ids), END)], logprob_top_k=2
        )
    return tokens


def test_completions_name_tokens_by_id(shim: RunningShim, llama_server: Any, model: str) -> None:
    with SalienceClient(llama_server.target) as client:
        prompt_ids = client.tokenize(PROMPT, add_special_tokens=True)
    decoded = _grpc_greedy(llama_server.target, prompt_ids, 6)
    reply = shim.client().completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    logprobs = reply.choices[0].logprobs
    want = [f"token_id:{i}" for i in [*prompt_ids, *(t.token_id for t in decoded)]]
    assert logprobs.tokens == want
    for top, token in zip(logprobs.top_logprobs[len(prompt_ids) :], decoded, strict=True):
        named = {f"token_id:{i}": lp for i, lp in token.top_logprobs}
        named.setdefault(f"token_id:{token.token_id}", token.logprob)
        assert top == pytest.approx(named, abs=1e-5)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_names_tokens_by_id(
    shim: RunningShim, llama_server: Any, model: str, stream: bool
) -> None:
    client = shim.client()
    fields: dict[str, Any] = dict(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True
    )
    plain = client.chat.completions.create(**fields, top_logprobs=2)
    named = client.chat.completions.create(
        **fields, top_logprobs=2, stream=stream, extra_body={"return_tokens_as_token_ids": True}
    )
    if stream:
        chunks = [c for c in named if c.choices and c.choices[0].logprobs]
        entries = [e for chunk in chunks for e in chunk.choices[0].logprobs.content]
    else:
        entries = named.choices[0].logprobs.content
    want = plain.choices[0].logprobs.content
    assert [e.token.startswith("token_id:") for e in entries] == [True] * len(want)
    ids = [int(e.token.removeprefix("token_id:")) for e in entries]
    # Each id's bytes are the token the plain reply printed.
    assert [bytes(e.bytes) for e in entries] == [bytes(e.bytes) for e in want]
    with SalienceClient(llama_server.target) as grpc_client:
        assert grpc_client.token_bytes(ids) == [bytes(e.bytes) for e in want]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in want], abs=1e-5)


def _stop_in(text: str) -> tuple[str, int]:
    """A two-character printable stop string of ``text`` and where it first starts."""
    for start in range(1, len(text) - 1):
        stop = text[start : start + 2]
        if stop.isascii() and stop.isprintable() and text.find(stop) == start:
            return stop, start
    raise AssertionError(f"no printable pair in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_stop_string_kept_in_the_text(shim: RunningShim, model: str, stream: bool) -> None:
    client = shim.client()

    def chat(**fields: Any) -> str:
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=30, temperature=0, stream=stream, **fields
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content

    def complete(**fields: Any) -> str:
        return _completion_text(shim, model, stream, max_tokens=30, **fields)

    for ask in (chat, complete):
        full = ask()
        stop, start = _stop_in(full)
        assert ask(stop=[stop]) == full[:start]
        kept = ask(stop=[stop], extra_body={"include_stop_str_in_output": True})
        assert kept == full[: start + len(stop)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_hold_the_end_of_turn_token(
    shim: RunningShim, llama_server: Any, model: str, stream: bool
) -> None:
    """Each decoded token has its entry, the end-of-turn one included (as vLLM's): it was
    left out while ``usage`` counted it, and a trainer needs the probability of ending
    the reply where it ended."""
    with SalienceClient(llama_server.target) as client:
        (eos, *_) = client.model_info().eos_token_ids
        (eos_bytes,) = client.token_bytes([eos])
    reply = shim.client().chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        logit_bias={str(eos): 100},  # the reply ends at once
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    if stream:
        chunks = list(reply)
        entries = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
        usage, finish = chunks[-1].usage, chunks[-2].choices[0].finish_reason
    else:
        entries, usage = reply.choices[0].logprobs.content, reply.usage
        finish = reply.choices[0].finish_reason
    assert (finish, usage.completion_tokens) == ("stop", 1)
    assert [bytes(e.bytes) for e in entries] == [eos_bytes]
    assert entries[0].logprob <= 0


def _vllm_prompt_logprobs(target: str, token_ids: list[int], top_k: int) -> list[Any]:
    """vLLM's ``prompt_logprobs`` of ``token_ids`` from the gRPC scoring path."""
    with SalienceClient(target) as client:
        with client.open_session() as session:
            *scored, _ = session.generate(
                token_ids, max_tokens=0, logprobs_ranges=[(0, END)], logprob_top_k=top_k
            )
        entries: list[Any] = [None]
        for token in scored[1:]:
            (text,) = [
                raw.decode("utf-8", "backslashreplace")
                for raw in client.token_bytes([token.token_id])
            ]
            entry = {
                str(token.token_id): {
                    "logprob": token.logprob,
                    "rank": token.rank,
                    "decoded_token": text,
                }
            }
            for rank, (token_id, logprob) in enumerate(token.top_logprobs, start=1):
                (raw,) = client.token_bytes([token_id])
                entry.setdefault(
                    str(token_id),
                    {
                        "logprob": logprob,
                        "rank": rank,
                        "decoded_token": raw.decode("utf-8", "backslashreplace"),
                    },
                )
            entries.append(entry)
    return entries


def _approx(entries: list[Any]) -> list[Any]:
    return [
        None
        if entry is None
        else {k: {**v, "logprob": pytest.approx(v["logprob"], abs=1e-5)} for k, v in entry.items()}
        for entry in entries
    ]


def test_prompt_logprobs_of_completions_and_chat(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    """vLLM's ``prompt_logprobs`` (a reference model's scores for RL, over the chat
    template too) was taken and ignored."""
    client = shim.client()
    prompt_ids, chat_ids = _prompt_ids(llama_server.target)
    want = _vllm_prompt_logprobs(llama_server.target, prompt_ids, 2)
    for _ in range(2):  # the second is scored from what the pooled session kept
        reply = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=3,
            n=2,
            temperature=0,
            extra_body={"prompt_logprobs": 2},
        )
        for choice in reply.choices:
            assert choice.model_extra["prompt_logprobs"] == _approx(want)
    chat = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=2,
        temperature=0,
        extra_body={"prompt_logprobs": 1},
    )
    assert chat.usage.prompt_tokens == len(chat_ids)
    got = chat.model_extra["prompt_logprobs"]
    assert got == _approx(_vllm_prompt_logprobs(llama_server.target, chat_ids, 1))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_body={"prompt_logprobs": 1}
        )
    assert caught.value.param == "prompt_logprobs"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("stop", [None, ["never here"]], ids=["server", "engine"])
def test_a_stop_token_s_text_is_left_out_unless_asked_for(
    shim: RunningShim, llama_server: Any, model: str, stream: bool, stop: list[str] | None
) -> None:
    """A ``stop_token_ids`` token that ends the reply leaves its text out, as a stop
    string's, unless ``include_stop_str_in_output`` (vLLM's rule): it was always in.
    Text is made by the server's handler, or by the engine where stop strings are."""
    with SalienceClient(llama_server.target) as client:
        prompt_ids = client.tokenize(PROMPT, add_special_tokens=True)
        decoded = [t.token_id for t in _grpc_greedy(llama_server.target, prompt_ids, 20)]
        pieces = client.token_bytes(decoded)
    # The first token that prints as one ASCII character not seen before it.
    at = next(
        i
        for i, raw in enumerate(pieces)
        if i > 0
        and len(raw) == 1
        and raw.isascii()
        and raw.decode().isprintable()
        and decoded[i] not in decoded[:i]
    )
    before = b"".join(pieces[:at]).decode("utf-8", "replace")

    def complete(**extra: Any) -> str:
        extra_body = {"stop_token_ids": [decoded[at]], **extra}
        return _completion_text(
            shim, model, stream, max_tokens=20, stop=stop, extra_body=extra_body
        )

    assert complete() == before
    assert complete(include_stop_str_in_output=True) == before + pieces[at].decode()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_token_ids_of_the_prompt_and_each_choice(
    shim: RunningShim, llama_server: Any, model: str, stream: bool
) -> None:
    """vLLM's ``return_token_ids`` (what RL frameworks train on, without retokenizing
    the text) was taken and ignored."""
    client = shim.client()
    prompt_ids, chat_ids = _prompt_ids(llama_server.target)
    fields: dict[str, Any] = dict(
        model=model,
        max_tokens=5,
        temperature=0,
        stream=stream,
        extra_body={"return_token_ids": True},
    )
    replies = [
        (client.completions.create(prompt=PROMPT, n=2, **fields), prompt_ids),
        (client.chat.completions.create(messages=MESSAGES, **fields), chat_ids),
    ]
    for reply, ids in replies:
        want = [t.token_id for t in _grpc_greedy(llama_server.target, ids, 5)]
        got: dict[int, list[int]] = {}
        if stream:
            chunks = list(reply)
            # Chat: at the top of each choice's first chunk; completions: in it.
            sent = [c.model_extra.get("prompt_token_ids") for c in chunks]
            sent += [ch.model_extra.get("prompt_token_ids") for c in chunks for ch in c.choices]
            for c in chunks:
                for ch in c.choices:
                    got.setdefault(ch.index, []).extend(ch.model_extra["token_ids"])
            assert [s for s in sent if s] == [ids] * len(got)  # once for each choice
        else:
            top = reply.model_extra.get("prompt_token_ids")
            for ch in reply.choices:
                assert (top or ch.model_extra["prompt_token_ids"]) == ids
                got[ch.index] = ch.model_extra["token_ids"]
        assert list(got.values()) == [want] * len(got) and got


@pytest.mark.parametrize("stop", [None, ["never here"]], ids=["server", "engine"])
def test_special_tokens_written_when_not_skipped(
    shim: RunningShim, llama_server: Any, model: str, stop: list[str] | None
) -> None:
    """vLLM's ``skip_special_tokens: false`` (a client parsing a template's markers)
    was taken and ignored: special tokens never had text."""
    with SalienceClient(llama_server.target) as client:
        (eos, *_) = client.model_info().eos_token_ids
        (eos_text,) = [raw.decode() for raw in client.token_bytes([eos])]

    def complete(**extra: Any) -> str:
        return _completion_text(
            shim,
            model,
            max_tokens=3,
            stop=stop,
            logit_bias={str(eos): 100},  # three end-of-sequence tokens, decoded past
            extra_body={"ignore_eos": True, **extra},
        )

    assert complete() == ""
    assert complete(skip_special_tokens=False) == eos_text * 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_reason_names_the_stop_that_ended_a_choice(
    shim: RunningShim, llama_server: Any, model: str, stream: bool
) -> None:
    """vLLM's ``stop_reason``: the stop string, or the ``stop_token_ids`` token, that
    ended the choice (a new ``Done.stop_string`` says which string); null for a limit."""
    client = shim.client()

    def reason(**fields: Any) -> Any:
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=30, temperature=0, stream=stream, **fields
        )
        if stream:
            (last,) = [c.choices[0] for c in reply if c.choices and c.choices[0].finish_reason]
            return last.finish_reason, last.model_extra["stop_reason"]
        return reply.choices[0].finish_reason, reply.choices[0].model_extra["stop_reason"]

    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0)
    stop, _ = _stop_in(full.choices[0].text)
    assert reason(stop=["never here", stop]) == ("stop", stop)
    with SalienceClient(llama_server.target) as grpc_client:
        prompt_ids = grpc_client.tokenize(PROMPT, add_special_tokens=True)
        (eos, *_) = grpc_client.model_info().eos_token_ids
    third = _grpc_greedy(llama_server.target, prompt_ids, 3)[2].token_id
    assert reason(extra_body={"stop_token_ids": [third]}) == ("stop", third)
    assert reason() == ("length", None)
    # The end-of-sequence token is no stop_reason, listed or not (as vLLM's).
    forced = {"logit_bias": {str(eos): 100}}
    assert reason(**forced, extra_body={"stop_token_ids": [eos]}) == ("stop", None)
