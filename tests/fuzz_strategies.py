"""Hypothesis strategies for malformed, extreme and odd gRPC requests (the fuzz tests
in ``tests/integration/test_fuzz_grpc.py``).

Each strategy mixes values a server must accept with the edges it must refuse
cleanly: zero, one past the vocabulary or the context, the largest uint32/int32/uint64,
NaN and infinities, empty and very long strings, odd unicode, repeated fields far
longer than any limit. Session ids are drawn from the example's live sessions, an
unknown id, the empty id and odd strings.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from salience_client.pb import salience_pb2 as pb

U32_MAX = 2**32 - 1
VOCAB = 259
"""The tiny models' vocabulary: 256 bytes and three specials (``tests/tiny_models.py``)."""

u32 = st.sampled_from([0, 1, 2, 7, 255, VOCAB - 1, VOCAB, 511, 512, 513, 2**31 - 1, U32_MAX]) | (
    st.integers(0, U32_MAX)
)
small_u32 = st.integers(0, 12) | st.sampled_from([VOCAB, 512, 2**31 - 1, U32_MAX])
i32 = st.sampled_from([-(2**31), -1, 0, 1, 2**31 - 1]) | st.integers(-(2**31), 2**31 - 1)
u64 = st.sampled_from([0, 1, 2**63 - 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)
token_id = st.integers(0, VOCAB - 1) | st.sampled_from([VOCAB, 2**31 - 1, U32_MAX])
odd_float = st.sampled_from(
    [0.0, -0.0, 1e-6, 0.5, 1.0, 1.0000001, 2.0, 2.5, -1.0, -2.5, 100.0, 1e30, -1e30]
    + [math.nan, math.inf, -math.inf, 3.4e38]
) | st.floats(width=32)
sane_float = st.sampled_from([0.0, 0.5, 1.0])
proto_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
"""Text a proto string field can hold (valid UTF-8: no lone surrogates)."""
odd_text = (
    proto_text
    | st.sampled_from(["", " ", "\x00", "\u202e", "\U0001f600" * 3, "a" * 300, "\n\r\t", "\ufffd"])
    | st.just("é" * 200)
)


def session_id(live: list[str]) -> st.SearchStrategy[str]:
    known = st.sampled_from(live) if live else st.nothing()
    return known | known | st.sampled_from(["", "unknown", "x" * 1000]) | proto_text


def ranges(max_size: int = 3) -> st.SearchStrategy[list[pb.PositionRange]]:
    one = st.builds(pb.PositionRange, start=u32 | st.integers(0, 20), end=u32 | st.integers(0, 20))
    many = st.lists(one, max_size=max_size)
    return many | st.integers(60, 200).map(lambda n: [pb.PositionRange(start=0, end=U32_MAX)] * n)


def constraint() -> st.SearchStrategy[pb.Constraint | None]:
    kinds = st.one_of(
        st.builds(pb.Constraint, json_object=st.booleans()),
        st.builds(
            pb.Constraint,
            json_schema=st.sampled_from(
                ["", "{", "[]", "null", '{"type": "object"}', '{"type": "nope"}', "1e999"]
            )
            | proto_text,
        ),
        st.builds(pb.Constraint, regex=st.sampled_from(["", "(", "a*", "[", "\\"]) | proto_text),
        st.builds(
            pb.Constraint, ebnf=st.sampled_from(["", "root ::= ", 'root ::= "a"']) | odd_text
        ),
        st.builds(pb.Constraint, lark=st.sampled_from(["", "start: ", 'start: "a"']) | odd_text),
    )

    def with_thinking(message: pb.Constraint, start: int | None, end: int | None) -> pb.Constraint:
        if start is not None:
            message.thinking_start_token = start
        if end is not None:
            message.thinking_end_token = end
        return message

    thinking = st.none() | token_id
    return st.none() | st.builds(with_thinking, kinds, thinking, thinking)


def generate_fields(live: dict[str, int], sid: str) -> dict[str, st.SearchStrategy[Any]]:
    """Each GenerateRequest field's odd values (``sid``: the call's session)."""
    length = live.get(sid, 0)
    return dict(
        append_tokens=st.lists(token_id, max_size=6)
        | st.integers(600, 5000).map(lambda n: [1] * n),
        offset=st.sampled_from([max(0, length - 2), length + 1, 0]) | u32,
        truncating=st.booleans(),
        max_tokens=small_u32,
        logprobs_ranges=ranges(),
        logprob_top_k=small_u32 | st.sampled_from([20, 21]),
        readout_ranges=ranges(1),
        temperature=odd_float,
        top_p=odd_float,
        top_k=small_u32,
        stop_token_ids=st.lists(token_id, max_size=3),
        priority=i32,
        stop_strings=st.lists(odd_text, max_size=3) | st.just(["a"] * 17),
        return_text=st.booleans(),
        min_p=odd_float,
        repetition_penalty=odd_float,
        ignore_eos=st.booleans(),
        frequency_penalty=odd_float,
        presence_penalty=odd_float,
        logit_bias=st.dictionaries(token_id, odd_float, max_size=3),
        min_tokens=small_u32,
        include_stop_string=st.booleans(),
        keep_special_tokens=st.booleans(),
        seed=u64,
        decode_start=u32 | st.integers(0, 20),
        constraint=constraint(),
    )


@st.composite
def generate_request(draw: st.DrawFn, live: dict[str, int]) -> pb.GenerateRequest:
    """A valid Generate call on one of ``live`` (id -> length), or another id, with up
    to four of its fields given odd values: each call gets past most checks but one."""
    sid = draw(session_id(list(live)))
    length = live.get(sid, 0)
    request = pb.GenerateRequest(
        session_id=sid,
        offset=length,
        append_tokens=draw(st.lists(st.integers(0, 255), max_size=4)),
        max_tokens=draw(st.integers(0, 4)),
        logprobs_ranges=[pb.PositionRange(start=max(0, length - 1), end=U32_MAX)],
        logprob_top_k=draw(st.integers(0, 3)),
        temperature=draw(sane_float),
        return_text=draw(st.booleans()),
    )
    fields = generate_fields(live, sid)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        _apply(request, name, draw(fields[name], label=name))
    return request


def readout_ranges(length: int) -> st.SearchStrategy[list[pb.PositionRange]]:
    """Readout ranges around a session of ``length`` (that a call may grow): over
    committed positions (recomputed), over the new ones and past them, through the
    end, empty, reversed, at position 0 and the uint32 edges, and ``ranges``' odd ones.
    Its choices do not depend on ``length`` (only their values do), so that a test
    whose lengths vary from run to run draws the same way."""
    edge = st.sampled_from([0, 1, max(0, length - 1), length, length + 1, U32_MAX - 1, U32_MAX])
    start = edge | st.integers(0, 60)
    width = st.sampled_from([0, 1, 2, 5, 60, U32_MAX])

    def build(start: int, width: int) -> pb.PositionRange:
        return pb.PositionRange(start=start, end=min(start + width, U32_MAX))

    sane = st.lists(st.builds(build, start, width), min_size=1, max_size=3)
    return st.sampled_from([sane] * 7 + [ranges()]).flatmap(lambda strategy: strategy)


def _apply(request: pb.GenerateRequest, name: str, value: Any) -> None:
    """Sets field ``name`` of ``request`` to ``value`` (repeated and map fields replaced)."""
    if name == "constraint":
        request.ClearField("constraint")
        if value is not None:
            request.constraint.CopyFrom(value)
    elif name in ("logprobs_ranges", "readout_ranges", "append_tokens", "stop_token_ids"):
        request.ClearField(name)
        getattr(request, name).extend(value)
    elif name == "stop_strings":
        request.ClearField(name)
        request.stop_strings.extend(value)
    elif name == "logit_bias":
        request.logit_bias.clear()
        request.logit_bias.update(value)
    else:
        setattr(request, name, value)


@st.composite
def readout_request(draw: st.DrawFn, session_id: str, length: int) -> pb.GenerateRequest:
    """A Generate call on session ``session_id`` of ``length`` tokens that asks for
    readout, with the call's other features: a rewind (an offset below the length,
    truncating), prefill only, scored ranges with top-k, stop strings and stop tokens,
    sampling (seeded or not), priorities (a call ahead of others preempts them), an
    append that repeats itself (drafts for n-gram speculation to verify); now and then
    one field given an odd value
    (``generate_fields``). Its choices do not depend on ``length``."""
    back = draw(st.sampled_from([0, 0, 1, 2, 5, 48]))
    offset = max(0, length - back)
    append = draw(st.lists(st.integers(3, 255), max_size=8))
    if draw(st.booleans()):
        append = (append * 4)[:12]
    request = pb.GenerateRequest(
        session_id=session_id,
        offset=offset,
        truncating=offset < length,
        append_tokens=append,
        max_tokens=draw(st.sampled_from([0, 0, 1, 2, 5, 9, 24])),
        readout_ranges=draw(readout_ranges(offset + len(append))),
        logprobs_ranges=draw(st.just([]) | readout_ranges(offset + len(append))),
        logprob_top_k=draw(st.sampled_from([0, 0, 1, 5])),
        temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.0])),
        ignore_eos=draw(st.booleans()),
        return_text=draw(st.booleans()),
        stop_strings=draw(st.lists(st.sampled_from(["a", "e", "\x00", "ab"]), max_size=2)),
        stop_token_ids=draw(st.lists(st.integers(3, 255), max_size=2)),
        priority=draw(st.sampled_from([0, 0, -1, 1])),
    )
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 4)) == 0:
        fields = generate_fields({session_id: length}, session_id)
        name = draw(st.sampled_from(sorted(fields)))
        _apply(request, name, draw(fields[name], label=name))
    return request


def image_bytes() -> st.SearchStrategy[tuple[bytes, str]]:
    """(bytes, mime) pairs: nothing, garbage, a truncated or mislabeled real image."""
    from tests.vision_support import encode, make_image

    png = encode(make_image(0, (20, 20)))
    jpeg = encode(make_image(1, (20, 20)), "JPEG")
    data = st.sampled_from([b"", b"\x00", png, png[:40], jpeg, jpeg[:-10], b"GIF89a" + b"\0" * 20])
    data = data | st.binary(max_size=64)
    mime = st.sampled_from(["image/png", "image/jpeg", "", "text/plain", "image/webp", "IMAGE/PNG"])
    return st.tuples(data, mime | proto_text)


def embed_request() -> st.SearchStrategy[pb.EmbedRequest]:
    """Texts, token lists, both or neither; odd pooling values and priorities."""
    texts = st.lists(odd_text, max_size=3)
    lists = st.lists(st.builds(pb.TokenIds, token_ids=st.lists(token_id, max_size=5)), max_size=3)
    long_list = st.integers(0, 600).map(lambda n: [pb.TokenIds(token_ids=[1] * n)])
    options = dict(
        pooling=st.sampled_from([0, 1, 2, 3, 2**31 - 1, -1]),
        normalize=st.booleans(),
        add_special_tokens=st.booleans(),
        priority=i32,
    )
    return (
        st.builds(pb.EmbedRequest, texts=texts, **options)
        | st.builds(pb.EmbedRequest, token_lists=lists | long_list, **options)
        | st.builds(pb.EmbedRequest, texts=texts, token_lists=lists, **options)
    )


def json_text() -> st.SearchStrategy[str]:
    """Strings that are, or almost are, chat message lists as JSON."""
    return (
        st.sampled_from(
            [
                "",
                "[]",
                "{}",
                "null",
                "[1]",
                '[{"role": "user"}]',
                '[{"role": "user", "content": null}]',
                '[{"role": "user", "content": [{"type": "image"}]}]',
                '[{"role": "user", "content": [{"type": "text", "text": 5}]}]',
                '[{"role": 7, "content": "x"}]',
                '[{"role": "user", "content": "x"}]' * 2,
                "[" * 200 + "]" * 200,
                '[{"role": "user", "content": "\\ud800"}]',
            ]
        )
        | proto_text
    )


def tokenize_request() -> st.SearchStrategy[pb.TokenizeRequest]:
    messages = st.builds(
        pb.ChatMessages,
        messages=st.lists(st.builds(pb.ChatMessage, role=odd_text, content=odd_text), max_size=3),
        messages_json=st.just("") | json_text(),
    )
    images = st.lists(
        image_bytes().map(lambda pair: pb.ImageData(data=pair[0], mime_type=pair[1])), max_size=2
    )
    common = dict(
        add_generation_prompt=st.booleans(),
        add_special_tokens=st.booleans(),
        tools_json=st.just("") | json_text(),
        chat_template_kwargs_json=st.just("") | json_text(),
        continue_final_message=st.booleans(),
        images=st.just([]) | images,
    )
    text = st.builds(pb.TokenizeRequest, text=odd_text, **common)
    chat = st.builds(pb.TokenizeRequest, messages=messages, **common)
    return text | chat | st.builds(pb.TokenizeRequest, **common)


def detokenize_request() -> st.SearchStrategy[pb.DetokenizeRequest]:
    return st.builds(
        pb.DetokenizeRequest,
        token_ids=st.lists(token_id | u32, max_size=8),
        skip_special_tokens=st.booleans(),
        return_token_bytes=st.booleans(),
    )
