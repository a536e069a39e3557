"""Images through the shim: data URLs become AppendImage calls (tiny Qwen2-VL)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from salience_client import SalienceClient
from salience_server.http.messages import IMAGE_PLACEHOLDER
from tests.shim_support import RunningShim, start_shim
from tests.tiny_models import build_tiny_vision_model
from tests.vision_support import encode, make_image


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.conftest import start_server

    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("shim-vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=8 << 20)
    server.extra["model_dir"] = model_dir
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shim(vision_server: Any) -> Iterator[RunningShim]:
    running = start_shim(vision_server.target)
    yield running
    running.stop()


PNG = encode(make_image(7))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def _messages(url: str = DATA_URL) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def _responses_input(url: str = DATA_URL) -> list[dict[str, Any]]:
    """The Responses form of ``_messages``."""
    content = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": url},
    ]
    return [{"role": "user", "content": content}]


def _grpc_answer(target: str, max_tokens: int) -> tuple[str, int]:
    """The same conversation through the gRPC client: text, image, text, decode."""
    with SalienceClient(target) as client, client.open_session() as session:
        info = client.model_info()
        messages = [{"role": "user", "content": "What is this?\n" + IMAGE_PLACEHOLDER}]
        ids = client.tokenize_chat(messages)
        pad = ids.index(info.image_pad_token_id)
        session.prefill(ids[:pad])
        count = session.append_image(PNG, "image/png")
        events = list(session.generate(ids[pad + 1 :], max_tokens=max_tokens))
    text = "".join(e.text for e in events[:-1])
    return text, count


def test_a_chat_with_a_data_url_image_answers_like_the_grpc_path(
    shim: RunningShim, vision_server: Any
) -> None:
    want_text, count = _grpc_answer(vision_server.target, 8)
    client = shim.client()
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=_messages(), max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content == want_text
    sessions = SalienceClient(vision_server.target).list_sessions()
    lengths = {s.length for s in sessions}
    # The session holds the placeholders: prompt (with all of them) plus the reply.
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens in lengths
    assert reply.usage.prompt_tokens > count  # the image counted its placeholders
    # A second turn with the same image reuses the whole first turn, image included.
    history = _messages() + [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And now?"},
    ]
    second = client.chat.completions.create(
        model=model, messages=history, max_tokens=4, temperature=0
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens


def test_cached_tokens_count_only_what_was_held_before_the_request(vision_server: Any) -> None:
    """The image and the text before it go in with calls of their own: the last call's
    Done counts them as cached, which this request put in itself."""
    fresh = start_shim(vision_server.target)  # an empty pool: nothing is held for it
    try:
        client = fresh.client()
        model = client.models.list().data[0].id
        first = client.chat.completions.create(
            model=model, messages=_messages(), max_tokens=2, temperature=0
        )
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        again = client.responses.create(
            model=model, input=_responses_input(), max_output_tokens=2, temperature=0
        )
        assert again.usage.input_tokens == first.usage.prompt_tokens
        # The same prompt: all of it but its last token is held (that one is decoded from).
        cached = again.usage.input_tokens_details.cached_tokens
        assert cached == again.usage.input_tokens - 1
    finally:
        fresh.stop()


def _close_every_session(target: str) -> None:
    with SalienceClient(target) as client:
        for info in client.list_sessions():
            client.session(info.session_id).close()


def test_a_pooled_session_the_server_lost_is_made_again_with_its_images(
    vision_server: Any,
) -> None:
    """Replay off, a pooled session gone from the server (its TTL passed) is replaced by
    a fresh one: a prompt whose images it held was sent with the images' markers as
    token ids (a 500), one adding an image failed NOT_FOUND."""
    shim = start_shim(vision_server.target, replay=False)
    try:
        client = shim.client()
        model = client.models.list().data[0].id
        first = client.chat.completions.create(
            model=model, messages=_messages(), max_tokens=3, temperature=0
        )
        longer = _messages() + [
            {"role": "assistant", "content": first.choices[0].message.content},
            *_messages(),  # another image, past what the pooled session holds
        ]
        for messages in (_messages(), longer):
            want = client.chat.completions.create(
                model=model, messages=messages, max_tokens=3, temperature=0
            )
            _close_every_session(vision_server.target)
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=3, temperature=0
            )
            assert reply.choices[0].message.content == want.choices[0].message.content
            assert reply.usage.prompt_tokens == want.usage.prompt_tokens
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        shim.stop()


def test_streaming_and_responses_take_images_too(shim: RunningShim, vision_server: Any) -> None:
    want_text, _ = _grpc_answer(vision_server.target, 6)
    client = shim.client()
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=_messages(), max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_text
    response = client.responses.create(
        model=model,
        input=_responses_input(),
        max_output_tokens=6,
        temperature=0,
    )
    assert response.output_text == want_text


def test_a_data_url_without_a_media_type_is_read_from_its_bytes(shim: RunningShim) -> None:
    """``data:;base64,...`` went to the server as application/octet-stream, which it
    refuses; it reads an image's type from its bytes when told none."""
    client = shim.client()
    url = "data:;base64," + base64.b64encode(PNG).decode()
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=_messages(url), max_tokens=2
    )
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


def test_remote_images_are_refused_unless_allowed(shim: RunningShim) -> None:
    client = shim.client()
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=_messages("https://example.com/cat.png"), max_tokens=2
        )
    assert "allow-remote-images" in str(caught.value)


def test_tokenize_counts_an_image_as_the_chat_completion_does(vision_server: Any) -> None:
    """On a fresh shim (no image's count known from an earlier append): /tokenize of the
    messages gives as many tokens as the chat completion's prompt; remote images are
    refused as the chat refuses them (they were counted one token each)."""
    fresh = start_shim(vision_server.target)
    try:
        root = fresh.base_url.removesuffix("/v1")
        tokenized = httpx.post(f"{root}/tokenize", json={"messages": _messages()})
        client = fresh.client()
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=_messages(), max_tokens=1
        )
        remote = httpx.post(
            f"{root}/tokenize", json={"messages": _messages("https://example.com/cat.png")}
        )
    finally:
        fresh.stop()
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["count"] == reply.usage.prompt_tokens
    assert remote.status_code == 400 and "allow-remote-images" in remote.text


def test_a_bad_image_is_a_400(shim: RunningShim) -> None:
    client = shim.client()
    model = client.models.list().data[0].id
    bad = "data:image/png;base64," + base64.b64encode(PNG[:100]).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=_messages(bad), max_tokens=2)
    assert caught.value.param == "messages"
    for stream in (False, True):  # Responses names its own field (it named "messages")
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(
                model=model,
                input=_responses_input(bad),
                max_output_tokens=2,
                stream=stream,
            )
        assert caught.value.param == "input"
    # The shim and the server go on.
    reply = client.chat.completions.create(
        model=model, messages=_messages(), max_tokens=2, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_truncation_auto_counts_images_at_their_length(tmp_path: Any) -> None:
    """A Responses conversation of image turns past a 300-token context, with truncation
    "auto": it measured each image as its one pad token, found the input fitting, and
    answered 400 ``context_length_exceeded``. The images count at their known length."""
    from tests.conftest import start_server

    model_dir = build_tiny_vision_model(tmp_path, "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=8 << 20, max_context=300)
    running = start_shim(server.target)
    try:
        client = running.client()
        model = client.models.list().data[0].id
        client.responses.create(  # the image's length is known from here on
            model=model, input=_responses_input(), max_output_tokens=2, temperature=0
        )
        conversation: list[dict[str, Any]] = []
        for turn in range(12):
            conversation += [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": f"turn {turn}"},
                        {"type": "input_image", "image_url": DATA_URL},
                    ],
                },
                {"role": "assistant", "content": f"answer {turn}"},
            ]
        conversation.append({"role": "user", "content": "and now?"})
        options = dict(model=model, input=conversation, max_output_tokens=2, temperature=0)
        with pytest.raises(openai.BadRequestError):
            client.responses.create(**options)
        response = client.responses.create(**options, truncation="auto")
        assert response.usage.input_tokens < 300
    finally:
        running.stop()
        server.stop()


def test_the_pool_closes_idle_sessions_holding_images_for_new_images(
    vision_server: Any, server_factory: Any
) -> None:
    """The server's host memory for image embeddings held what the pool's idle sessions
    had appended: requests with new images were then refused 429 until their TTL
    passed. Three conversations leave three idle sessions of one image each; two new
    ones of two images each, together, take two of those sessions (rewinding them) and
    need room for one more image than the rest leaves: the pool closes the third."""
    with SalienceClient(vision_server.target) as client, client.open_session() as probe:
        count = probe.append_image(PNG, "image/png")
    hidden = vision_server.engine.loaded.model.config.get_text_config().hidden_size
    image_bytes = count * hidden * 4  # float32 embeddings on the host
    tight = server_factory(
        vision_server.extra["model_dir"],
        block_size=4,
        kv_cache_bytes=8 << 20,
        host_kv_bytes=int(4.5 * image_bytes),
    )
    running = start_shim(tight.target)
    try:
        client = running.client()
        model = client.models.list().data[0].id

        def ask(name: str, seeds: list[int]) -> str | None:
            content: list[dict[str, Any]] = [{"type": "text", "text": f"Album {name}."}]
            for seed in seeds:
                url = "data:image/png;base64," + base64.b64encode(encode(make_image(seed))).decode()
                content.append({"type": "image_url", "image_url": {"url": url}})
            messages = [{"role": "user", "content": content}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(ask, "abc", [[41], [42], [43]]))
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(ask, "de", [[44, 45], [46, 47]]))
        assert all(reply is not None for reply in replies)
    finally:
        running.stop()


def test_a_requests_priority_goes_with_its_images(
    shim: RunningShim, vision_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's ``priority`` reaches every call a request makes: the text before an image,
    the image, and the decoding call (the first two ran at 0)."""
    engine = vision_server.engine
    submitted: list[tuple[bool, int]] = []  # (an image, priority)
    submit = engine.submit

    def recording_submit(params: Any, sink: Any, image: Any = None) -> Any:
        submitted.append((image is not None, params.priority))
        return submit(params, sink, image)

    monkeypatch.setattr(engine, "submit", recording_submit)
    client = shim.client()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which is it, 7?"}]}]
    messages += _messages(
        url="data:image/png;base64," + base64.b64encode(encode(make_image(8))).decode()
    )
    client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=messages,
        max_tokens=2,
        extra_body={"priority": 4},
    )
    assert (True, 4) in submitted and len(submitted) >= 3
    assert {priority for _, priority in submitted} == {4}


def test_a_chained_response_after_an_image_continues_its_session(shim: RunningShim) -> None:
    """A ``previous_response_id`` turn after one that sent a new image appends only the
    new input: the stored rendering held one placeholder for the image (its length
    unknown until it went in), so the next rendering never extended it and the whole
    conversation was rendered again, the reply prefilled anew from its text."""
    client = shim.client()
    model = client.models.list().data[0].id
    url = "data:image/png;base64," + base64.b64encode(encode(make_image(41))).decode()
    first = client.responses.create(
        model=model, input=_responses_input(url), max_output_tokens=4, temperature=0
    )
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input="And now?",
        max_output_tokens=2,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None
    held = first.usage.input_tokens + first.usage.output_tokens
    # All but the last token of the first turn (decoded, never fed to the model).
    assert second.usage.input_tokens_details.cached_tokens == held - 1
