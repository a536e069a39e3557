"""Sampling fields through the shim, as vLLM reads them: its seed of -1 is no seed, and
its sampling fields this server does not implement are refused rather than ignored."""

from __future__ import annotations

import openai
import pytest

from tests.shim_support import HELLO, RunningShim


def _token_ids(shim: RunningShim, model: str, **extra: object) -> list[list[int]]:
    reply = shim.client().chat.completions.create(
        model=model,
        messages=HELLO,
        max_tokens=8,
        temperature=1.0,
        n=4,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
    )
    return [choice.token_ids for choice in reply.choices]  # type: ignore[attr-defined]


def test_a_seed_of_minus_one_is_no_seed(shim: RunningShim, model: str) -> None:
    """vLLM reads seed -1 as unset; here it was the fixed seed 2**64 - 1, the same reply
    every time."""
    first = _token_ids(shim, model, seed=-1)
    assert first != _token_ids(shim, model, seed=-1)  # 4 x 8 tokens drawn alike: never
    assert _token_ids(shim, model, seed=5) == _token_ids(shim, model, seed=5)


@pytest.mark.parametrize(
    "field",
    [
        {"allowed_token_ids": [65, 66]},
        {"bad_words": ["a"]},
        {"logits_processors": ["my.processor"]},
        {"use_beam_search": True},
    ],
    ids=lambda field: next(iter(field)),
)
def test_vllm_sampling_fields_not_implemented_are_refused(
    shim: RunningShim, model: str, field: dict[str, object]
) -> None:
    """They were kept as unknown fields and ignored: the reply held the tokens they rule
    out. Sent empty or false they ask for nothing, and pass."""
    client = shim.client()
    ((name, value),) = field.items()
    for endpoint in ("chat", "completions"):
        with pytest.raises(openai.BadRequestError) as error:
            if endpoint == "chat":
                client.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=2, extra_body=field
                )
            else:
                client.completions.create(model=model, prompt="ab", max_tokens=2, extra_body=field)
        assert error.value.body["param"] == name
        assert error.value.body["code"] == "unsupported_parameter"
    empty = [] if isinstance(value, list) else False
    reply = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=2, extra_body={name: empty}
    )
    assert reply.choices[0].message is not None
