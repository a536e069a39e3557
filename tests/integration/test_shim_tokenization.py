"""/tokenize, /detokenize and /tokenizer_info as vLLM shapes them, and chat template
variables reaching a real template (a tiny model whose template knows Qwen3's
``enable_thinking``).

Oracle: the same tokenizer and template run by transformers in the test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from salience_client import SalienceClient
from salience_server.engine import tokenization
from tests.conftest import RunningServer, start_server
from tests.shim_support import RunningShim, greedy_reply, start_shim
from tests.tiny_models import build_tiny_model, with_special_tokens_around_text
from tests.unit.test_tokenization import THINKING_TEMPLATE

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = build_tiny_model(tmp_path_factory.mktemp("tiny-thinking"), "qwen3", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def thinking_server(thinking_dir: Path) -> Iterator[RunningServer]:
    server = start_server(str(thinking_dir), block_size=4, kv_cache_bytes=4 << 20)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shim(thinking_server: RunningServer) -> Iterator[RunningShim]:
    running = start_shim(thinking_server.target)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tokenizer(thinking_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(thinking_dir)


def _root(shim: RunningShim) -> str:
    return shim.base_url.removesuffix("/v1")


def _tokenize(shim: RunningShim, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{_root(shim)}/tokenize", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_tokenize_a_prompt(shim: RunningShim, tokenizer: Any) -> None:
    text = "café ☕"
    body = _tokenize(shim, prompt=text, return_token_strs=True)
    want = tokenizer.encode(text)
    assert body["tokens"] == want and body["count"] == len(want)
    assert body["max_model_len"] == 512
    # One token per byte here: the strings are the bytes, escaped where they are no text.
    assert body["token_strs"] == [
        bytes([b]).decode("utf-8", errors="backslashreplace") for b in text.encode()
    ]
    plain = _tokenize(shim, prompt=text, add_special_tokens=False)
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert plain["token_strs"] is None


def test_tokenize_messages_through_the_template(shim: RunningShim, tokenizer: Any) -> None:
    body = _tokenize(shim, messages=HELLO)
    assert body["tokens"] == _chat_ids(tokenizer, HELLO, add_generation_prompt=True)
    quiet = _tokenize(shim, messages=HELLO, chat_template_kwargs={"enable_thinking": False})
    want = _chat_ids(tokenizer, HELLO, add_generation_prompt=True, enable_thinking=False)
    assert quiet["tokens"] == want and want != body["tokens"]
    bare = _tokenize(shim, messages=HELLO, add_generation_prompt=False)
    assert bare["tokens"] == _chat_ids(tokenizer, HELLO, add_generation_prompt=False)
    reply = [*HELLO, {"role": "assistant", "content": "Hi th"}]
    open_reply = _tokenize(shim, messages=reply, continue_final_message=True)
    assert open_reply["tokens"] == _chat_ids(tokenizer, reply, continue_final_message=True)
    with_bos = _tokenize(shim, messages=HELLO, add_special_tokens=True)
    special = tokenizer("", add_special_tokens=True)["input_ids"]
    assert with_bos["tokens"] == special + body["tokens"]


def test_tokenize_refuses_what_is_not_one_input(shim: RunningShim) -> None:
    for body in [{}, {"prompt": "a", "messages": HELLO}, {"messages": HELLO, "model": "gpt-9"}]:
        response = httpx.post(f"{_root(shim)}/tokenize", json=body)
        assert response.status_code in (400, 404), body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_detokenize(shim: RunningShim, tokenizer: Any) -> None:
    ids = tokenizer.encode("Grüße <|im_end|>")
    response = httpx.post(f"{_root(shim)}/detokenize", json={"tokens": ids})
    assert response.json() == {"prompt": tokenizer.decode(ids)}
    bad = httpx.post(f"{_root(shim)}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_token"
    assert httpx.post(f"{_root(shim)}/detokenize", json={"tokens": [-1]}).status_code == 400


def test_tokenizer_info(shim: RunningShim, tokenizer: Any) -> None:
    info = httpx.get(f"{_root(shim)}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token == "<|im_end|>"
    assert info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == THINKING_TEMPLATE and info["model_max_length"] == 512


def test_tokenizer_info_names_the_tokenizers_eos_among_several(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Llama 3.1's and Qwen2.5's instruct models list more EOS ids in their generation
    config than the tokenizer's one, some smaller: /tokenizer_info named the smallest
    (``<|endoftext|>`` for Qwen2.5's ``<|im_end|>``) as the tokenizer's EOS."""
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    smaller = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert smaller < tokenizer.eos_token_id
    config = {"eos_token_id": [tokenizer.eos_token_id, smaller]}
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=1 << 20)
    shim = start_shim(server.target)
    try:
        info = httpx.get(f"{_root(shim)}/tokenizer_info").json()
        assert info["eos_token"] == tokenizer.eos_token == "<|im_end|>"
        with SalienceClient(server.target) as client:  # both still stop decoding
            assert set(client.model_info().eos_token_ids) == {tokenizer.eos_token_id, smaller}
    finally:
        shim.stop()
        server.stop()


def test_the_server_gives_each_tokens_bytes(thinking_server: RunningServer) -> None:
    with SalienceClient(thinking_server.target) as client:
        ids = client.tokenize("naïve ☕")
        assert client.token_bytes(ids) == [bytes([b]) for b in "naïve ☕".encode()]


def test_enable_thinking_reaches_the_template_of_a_chat(
    shim: RunningShim, thinking_server: RunningServer, tokenizer: Any
) -> None:
    model = shim.client().models.list().data[0].id
    want_ids = _chat_ids(tokenizer, HELLO, add_generation_prompt=True, enable_thinking=False)
    reply = shim.client().chat.completions.create(
        model=model,
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert reply.usage.prompt_tokens == len(want_ids)
    with SalienceClient(thinking_server.target) as client, client.open_session() as session:
        *tokens, _ = session.generate(want_ids, max_tokens=6)
    text = "".join(t.text for t in tokens)
    # A reasoning template, but the reply opened no <think>: it is all content.
    message = reply.choices[0].message
    assert message.content == text and message.reasoning_content is None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    plain, *_ = greedy_reply(thinking_server.target, HELLO, 6)
    default = shim.client().chat.completions.create(
        model=model, messages=HELLO, max_tokens=6, temperature=0
    )
    assert default.choices[0].message.content == plain


def test_an_answer_past_the_grpc_message_limit_is_400_not_429(tiny_llama_dir: Path) -> None:
    """A /detokenize whose text passes the server's gRPC message limit (1 MiB here, 64
    MiB by default) is refused by gRPC itself: it was a 429 "the server is overloaded"
    with Retry-After, which a client retries in vain. The server serves on."""
    server = start_server(
        str(tiny_llama_dir),
        server_options={"max_message_bytes": 1 << 20},
        block_size=4,
        kv_cache_bytes=1 << 20,
    )
    shim = start_shim(server.target)
    try:
        tokenizer = server.engine.loaded.tokenizer
        special = tokenizer.convert_tokens_to_ids("<|im_start|>")
        tokens = [special] * ((1 << 20) // len("<|im_start|>") + 1)
        response = httpx.post(f"{_root(shim)}/detokenize", json={"tokens": tokens})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "message_too_large" and "retry-after" not in response.headers
        assert "larger than max" in error["message"]
        response = httpx.post(f"{_root(shim)}/detokenize", json={"tokens": tokens[:1000]})
        assert response.status_code == 200
        assert response.json()["prompt"] == tokenizer.decode(tokens[:1000])
    finally:
        shim.stop()
        server.stop()


def test_a_text_past_the_tokenize_limit_is_400(
    shim: RunningShim, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server tokenizes at most MAX_TOKENIZED_CHARS characters a call (a 60 MB text
    took it to 10 GB): past them /tokenize, and a chat cut by truncate_prompt_tokens
    (which may be longer than the context), are a 400 naming the field."""
    monkeypatch.setattr(tokenization, "MAX_TOKENIZED_CHARS", 200)
    long = "word " * 60
    response = httpx.post(f"{_root(shim)}/tokenize", json={"model": model, "prompt": long})
    assert response.status_code == 400, response.text
    assert "at most 200 are tokenized" in response.json()["error"]["message"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": long}],
        "max_tokens": 2,
        "truncate_prompt_tokens": 8,
    }
    response = httpx.post(f"{shim.base_url}/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    body["messages"] = [{"role": "user", "content": "word " * 20}]
    assert httpx.post(f"{shim.base_url}/chat/completions", json=body).status_code == 200


def test_tokenize_messages_adds_the_special_tokens_a_text_gets_where_it_gets_them(
    tiny_llama_dir: Path, server_factory: Any, tmp_path: Path
) -> None:
    """``add_special_tokens`` on messages tokenizes the rendered chat as a text, as vLLM
    does: a tokenizer that adds an EOS after a text has it at the end (everything an
    empty text tokenizes to was put in front, the EOS with the BOS)."""
    model_dir = with_special_tokens_around_text(
        tiny_llama_dir, tmp_path / "model", "<s> $A <|im_end|>"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    shim = start_shim(server_factory(model_dir).target)
    try:
        body = _tokenize(shim, messages=HELLO, add_special_tokens=True)
        assert body["tokens"] == tokenizer(rendered)["input_ids"]
        assert body["tokens"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    finally:
        shim.stop()
