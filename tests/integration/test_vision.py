"""AppendImage on tiny Qwen2-VL and Qwen2.5-VL models against transformers (the oracle)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from salience_client import SalienceClient, SalienceClientError
from salience_client.pb import salience_pb2 as pb
from salience_server.text_checks import IMAGE_PLACE
from tests.helpers import U32_MAX, error_reason, generate, open_session
from tests.vision_support import (
    TOLERANCE,
    append_pieces,
    encode,
    make_image,
    model_info,
    reference_inputs,
)


def test_model_info_reports_images(vision) -> None:
    info = model_info(vision)
    assert info.supports_images
    assert info.image_pad_token_id and info.vision_start_token_id and info.vision_end_token_id


def test_text_image_text_equals_one_forward_pass_then_greedy_equals_generate(vision) -> None:
    image = make_image(1)
    text_before, text_after = [10, 20, 30, 40, 50], [60, 70, 80, 90, 100, 110]
    session_id = open_session(vision.stub)
    length, events = append_pieces(
        vision, session_id, [text_before, image, text_after], logprobs_from=1
    )
    inputs = reference_inputs(vision, [text_before, image, text_after])
    assert length == inputs["input_ids"].shape[1]
    model = vision.extra["reference"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0].float(), -1)
    ids = inputs["input_ids"][0]
    after = [e for e in events if e.position > length - len(text_after) - 2]  # end token and text
    assert len(after) == len(text_after) + 1
    for event in after:
        assert (
            abs(event.sampled_logprob - logprobs[event.position - 1, ids[event.position]].item())
            < TOLERANCE
        )
    tokens, _ = generate(vision.stub, session_id, offset=length, max_tokens=12)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, length:].tolist()
    assert [t.id for t in tokens] == want


def test_a_transparent_image_is_read_as_the_image_processor_reads_it(vision) -> None:
    """Transparent pixels lie over white, as the transformers processor lays them (a
    plain RGB conversion read them black)."""
    rgb = np.asarray(make_image(5, (56, 56)))
    alpha = np.random.default_rng(6).integers(0, 256, (56, 56, 1), dtype=np.uint8)
    image = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
    text = [60, 70, 80]
    session_id = open_session(vision.stub)
    length, events = append_pieces(vision, session_id, [[10, 20], image, text], logprobs_from=1)
    inputs = reference_inputs(vision, [[10, 20], image, text])
    with torch.no_grad():
        logprobs = torch.log_softmax(vision.extra["reference"](**inputs).logits[0].float(), -1)
    ids = inputs["input_ids"][0]
    after = [e for e in events if e.position >= length - len(text)]
    assert len(after) == len(text)
    for event in after:
        want = logprobs[event.position - 1, ids[event.position]].item()
        assert abs(event.sampled_logprob - want) < TOLERANCE


def test_two_images_and_rewinding_before_the_second(vision) -> None:
    first, second, other = make_image(2), make_image(3, (70, 70)), make_image(4, (100, 50))
    stub = vision.stub
    rewound = open_session(stub)
    length, _ = append_pieces(vision, rewound, [[5, 6, 7], first, [8, 9], second, [11, 12]])
    cut = len(reference_inputs(vision, [[5, 6, 7], first, [8, 9]])["input_ids"][0])
    # Truncating into the middle of an image is refused and changes nothing.
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, rewound, append_tokens=[1], offset=cut + 3, truncating=True)
    assert error_reason(caught.value) == "TRUNCATES_IMAGE"
    generate(stub, rewound, append_tokens=[], offset=cut, truncating=True)
    info = model_info(vision)
    generate(stub, rewound, append_tokens=[info.vision_start_token_id], offset=cut)
    response = stub.AppendImage(
        pb.AppendImageRequest(
            session_id=rewound, image=encode(other), mime_type="image/png", offset=cut + 1
        )
    )
    length = response.total_length
    got, _ = generate(
        stub,
        rewound,
        append_tokens=[info.vision_end_token_id, 13, 14],
        offset=length,
        max_tokens=8,
        logprobs_ranges=[(length + 1, U32_MAX)],
    )
    fresh = open_session(stub)
    fresh_length, _ = append_pieces(vision, fresh, [[5, 6, 7], first, [8, 9], other])
    want, _ = generate(
        stub,
        fresh,
        append_tokens=[13, 14],
        offset=fresh_length,
        max_tokens=8,
        logprobs_ranges=[(fresh_length, U32_MAX)],
    )
    assert [t.id for t in got] == [t.id for t in want]
    assert (
        max(abs(a.sampled_logprob - b.sampled_logprob) for a, b in zip(got, want, strict=True))
        < TOLERANCE
    )


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny body."""
    data = bytearray(encode(make_image(0, (8, 8))))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header) & 0xFFFFFFFF)
    return bytes(data)


BAD_IMAGES = {
    "empty": (b"", "image/png", "EMPTY_IMAGE"),
    "truncated png": (encode(make_image(5))[:200], "image/png", "BAD_IMAGE"),
    "mime mismatch": (encode(make_image(5), "JPEG"), "image/png", "MIME_MISMATCH"),
    "unsupported type": (encode(make_image(5), "BMP"), "image/bmp", "UNSUPPORTED_IMAGE_TYPE"),
    "20000x20000": (_png_claiming(20000, 20000), "image/png", "IMAGE_TOO_LARGE"),
    # Qwen2-VL's processor refuses an aspect ratio over 200 (it was UNKNOWN, retried).
    "1x5000": (encode(make_image(5, (1, 5000))), "image/png", "BAD_IMAGE"),
}


def _mpo() -> bytes:
    """A phone camera's JPEG: MPO, a JPEG whose first picture is the photo."""
    buffer = io.BytesIO()
    make_image(6).save(buffer, format="MPO", save_all=True, append_images=[make_image(7)])
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "mime"),
    [(_mpo(), "image/jpeg"), (encode(make_image(6)), "image/png; charset=binary")],
    ids=["mpo-as-jpeg", "mime-with-parameters"],
)
def test_images_as_cameras_and_clients_send_them_are_taken(data: bytes, mime: str, vision) -> None:
    """Both were UNSUPPORTED_IMAGE_TYPE: MPO is how many phones write JPEGs, and a MIME
    type may carry parameters. The image is the first picture, as JPEG readers show it."""
    session_id = open_session(vision.stub)
    generate(vision.stub, session_id, append_tokens=[1, 2, 3])
    request = pb.AppendImageRequest(session_id=session_id, image=data, mime_type=mime, offset=3)
    assert vision.stub.AppendImage(request).placeholder_count > 0


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_are_refused_fast_and_change_nothing(name: str, vision) -> None:
    """Refused by checks made before the vision encoder (most before decoding), in a few
    milliseconds here: the bound is 5 s, far above that, so that a loaded machine's
    stalls do not fail it (it was 1 s)."""
    data, mime, reason = BAD_IMAGES[name]
    session_id = open_session(vision.stub)
    generate(vision.stub, session_id, append_tokens=[1, 2, 3])
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        vision.stub.AppendImage(
            pb.AppendImageRequest(session_id=session_id, image=data, mime_type=mime, offset=3)
        )
    assert time.monotonic() - start < 5.0
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    assert vision.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.length == 3


def test_one_scoring_call_over_committed_text_and_an_image(vision) -> None:
    """The Rust client's scoring flow (SPEC 2.1): prefill-only chunks and an image
    first, then one call whose range covers them all. Text positions equal one forward
    pass; image placeholders carry no logprob; each position comes once, in order."""
    image = make_image(4)
    before, after = [11, 12, 13, 14], [15, 16, 17]
    session_id = open_session(vision.stub)
    length, _ = append_pieces(vision, session_id, [before, image, [18]])
    tokens, done = generate(
        vision.stub,
        session_id,
        append_tokens=after,
        offset=length,
        logprobs_ranges=[(1, U32_MAX)],
        logprob_top_k=2,
    )
    inputs = reference_inputs(vision, [before, image, [18] + after])
    ids = inputs["input_ids"][0]
    assert [t.position for t in tokens] == list(range(1, len(ids)))
    assert [t.id for t in tokens] == ids[1:].tolist()
    with torch.no_grad():
        logprobs = torch.log_softmax(vision.extra["reference"](**inputs).logits[0].float(), -1)
    pad = model_info(vision).image_pad_token_id
    for token in tokens:
        if token.id == pad:
            assert token.sampled_logprob == 0.0 and not token.top_logprobs and token.rank == 0
        else:
            want = logprobs[token.position - 1, token.id].item()
            assert abs(token.sampled_logprob - want) < TOLERANCE and len(token.top_logprobs) == 2
    assert done.recomputed_tokens == 0


def test_the_rust_clients_scoring_flow_through_the_python_client(vision) -> None:
    """Prefill-only chunks and an image through ``Session``, then one ``score`` call
    whose range covers committed text on both sides of the image, against one forward
    pass (image positions carry no logprob, so they add nothing to the sum)."""
    from salience_client import SalienceClient

    info = model_info(vision)
    image = make_image(5)
    before, middle, scored = [21, 22, 23], [24, 25], [26, 27, 28]
    with SalienceClient(vision.target) as client, client.open_session() as session:
        session.prefill(before + [info.vision_start_token_id])
        placeholders = session.append_image(encode(image), "image/png")
        session.prefill([info.vision_end_token_id] + middle)
        start = session.length - len(middle)  # the range starts before the call's offset
        (total,) = session.score(scored, ranges=[(1, start + len(middle) + len(scored))])
        assert session.length == len(before) + 1 + placeholders + 1 + len(middle) + len(scored)
    inputs = reference_inputs(vision, [before, image, middle + scored])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        logprobs = torch.log_softmax(vision.extra["reference"](**inputs).logits[0].float(), -1)
    want = sum(
        logprobs[p - 1, ids[p]].item()
        for p in range(1, len(ids))
        if ids[p] != info.image_pad_token_id
    )
    assert abs(total - want) < 1e-3


def test_an_image_append_cancelled_midway_is_rewound_by_the_next_call(vision) -> None:
    """An asyncio task cancelled while its AppendImage runs (the server has put the
    image's placeholders in): the session holds what it held before, as after a stream
    left early; the next call rewinds the image (it met OFFSET_MISMATCH, then kept it)."""
    import asyncio

    from salience_client import AsyncSalienceClient

    info = model_info(vision)
    execute = vision.engine.runner.execute

    def slow_execute(batch, uploads=None):
        time.sleep(0.3)
        return execute(batch, uploads)

    async def scenario() -> None:
        async with AsyncSalienceClient(vision.target, timeout=30) as client:
            async with await client.open_session() as session:
                await session.prefill([21, 22, info.vision_start_token_id])
                vision.engine.runner.execute = slow_execute
                try:
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(
                            session.append_image(encode(make_image(3)), "image/png"), 0.2
                        )
                finally:
                    vision.engine.runner.execute = execute
                done = await session.prefill([23])
                assert done.total_tokens == 4 == session.length == (await session.info()).length

    asyncio.run(scenario())


def test_an_image_runs_at_its_calls_priority(vision, monkeypatch: pytest.MonkeyPatch) -> None:
    """AppendImage takes a priority as Generate does (every image ran at 0), through the
    raw stub and the client alike."""
    engine = vision.engine
    submitted: list[int] = []
    submit = engine.submit

    def recording_submit(params, sink, image=None):  # type: ignore[no-untyped-def]
        if image is not None:
            submitted.append(params.priority)
        return submit(params, sink, image)

    monkeypatch.setattr(engine, "submit", recording_submit)
    info = model_info(vision)
    session_id = open_session(vision.stub)
    generate(vision.stub, session_id, append_tokens=[21, info.vision_start_token_id])
    request = pb.AppendImageRequest(
        session_id=session_id, image=encode(make_image(4)), mime_type="image/png", offset=2
    )
    request.priority = 6
    vision.stub.AppendImage(request)
    with SalienceClient(vision.target, timeout=30) as client:
        with client.open_session() as session:
            session.prefill([21, info.vision_start_token_id])
            session.append_image(encode(make_image(4)), "image/png", priority=-2)
    assert submitted == [6, -2]


def test_tokenize_makes_each_image_place_the_tokens_append_image_makes(vision) -> None:
    """Oracle: AppendImage's placeholder count for each image (of sizes the processor
    resizes differently). Without images each place stays one pad token; images that do
    not match the places, or a model without images, are refused."""
    images = [encode(make_image(seed, size)) for seed, size in [(1, (90, 60)), (2, (31, 203))]]
    messages = [
        {"role": "user", "content": f"one {IMAGE_PLACE} two {IMAGE_PLACE} done"},
    ]
    with SalienceClient(vision.target) as client:
        pad = client.model_info().image_pad_token_id
        plain = client.tokenize_chat(messages)
        counted = client.tokenize_chat(messages, images=[(data, "image/png") for data in images])
        with client.open_session() as session:
            session.prefill([1, 2])
            want = [session.append_image(data, "image/png") for data in images]
        with pytest.raises(SalienceClientError) as caught:
            client.tokenize_chat(messages, images=[(images[0], "image/png")])
        with pytest.raises(grpc.RpcError) as as_text:  # they were ignored
            vision.stub.Tokenize(
                pb.TokenizeRequest(text="one", images=[pb.ImageData(data=images[0])])
            )
        assert error_reason(as_text.value) == "INVALID_INPUT"
    assert want[0] != want[1]
    assert plain.count(pad) == 2
    expected = []
    for token_id in plain:
        expected += [pad] * want.pop(0) if token_id == pad else [token_id]
    assert counted == expected
    assert caught.value.reason == "BAD_MESSAGES"


def test_the_image_pad_token_is_refused_as_text(vision) -> None:
    """It stands for an image's embeddings: appended as text (what Tokenize's ids of a
    chat with images hold) it was embedded as a word, and the reply was silently wrong.
    Generate and Embed refuse it; the session is unchanged."""
    pad = model_info(vision).image_pad_token_id
    session_id = open_session(vision.stub)
    generate(vision.stub, session_id, append_tokens=[1, 2, 3])
    with pytest.raises(grpc.RpcError) as caught:
        generate(vision.stub, session_id, offset=3, append_tokens=[4, pad, 5], max_tokens=1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_TOKEN"
    assert "AppendImage" in caught.value.details()
    assert vision.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.length == 3
    with pytest.raises(grpc.RpcError) as caught:
        vision.stub.Embed(pb.EmbedRequest(token_lists=[pb.TokenIds(token_ids=[1, pad])]))
    assert error_reason(caught.value) == "INVALID_TOKEN"
