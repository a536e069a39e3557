"""Images under memory pressure on tiny Qwen2-VL and Qwen2.5-VL models: an image's
session evicted and recomputed, image embeddings in the host budget, and an image
making room in host memory."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch

from salience_client import SalienceClient, SalienceClientError
from salience_client.pb import salience_pb2 as pb
from tests.helpers import U32_MAX, error_reason, generate, open_session
from tests.vision_support import TOLERANCE, append_pieces, encode, make_image


def test_image_survives_eviction_and_recompute(vision, server_factory) -> None:
    # The host budget holds the image's embeddings (6 x 64 float32), not the KV: dropped.
    tight = server_factory(
        vision.extra["model_dir"], block_size=4, kv_cache_bytes=7 * 4 * 512, host_kv_bytes=2048
    )
    roomy = server_factory(vision.extra["model_dir"], block_size=4, kv_cache_bytes=4 << 20)
    image = make_image(6)
    results = []
    for server in (roomy, tight):
        first = open_session(server.stub)
        length, _ = append_pieces(server, first, [[1, 2], image, [3]])
        other = open_session(server.stub)  # pushes the first session out of the tight pool
        generate(server.stub, other, append_tokens=[9] * 20)
        tokens, done = generate(
            server.stub,
            first,
            append_tokens=[4, 5],
            offset=length,
            max_tokens=6,
            logprobs_ranges=[(length, U32_MAX)],
        )
        results.append((tokens, done))
    (want, _), (got, done) = results
    assert done.recomputed_tokens > 0
    assert [t.id for t in got] == [t.id for t in want]
    assert (
        max(abs(a.sampled_logprob - b.sampled_logprob) for a, b in zip(got, want, strict=True))
        < TOLERANCE
    )


def test_image_embeddings_are_held_in_the_host_budget(vision, server_factory) -> None:
    """Embeddings live in host memory, counted once however many forks share them; an
    image that cannot fit is refused before anything changes."""
    image_bytes = 6 * 64 * 4  # 6 placeholders of 64 float32
    server = server_factory(
        vision.extra["model_dir"], block_size=4, kv_cache_bytes=4 << 20, host_kv_bytes=image_bytes
    )
    engine = server.engine
    first = open_session(server.stub)
    length, _ = append_pieces(server, first, [[1, 2], make_image(6), [3]])
    assert engine.evictor.host_bytes_used == image_bytes
    child = server.stub.ForkSession(pb.ForkSessionRequest(session_id=first)).session_id
    assert engine.evictor.host_bytes_used == image_bytes  # shared, counted once
    second = open_session(server.stub)
    generate(server.stub, second, append_tokens=[6])
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.AppendImage(
            pb.AppendImageRequest(
                session_id=second, image=encode(make_image(8)), mime_type="image/png", offset=1
            )
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "HOST_MEMORY_FULL"
    assert server.stub.GetSession(pb.GetSessionRequest(session_id=second)).session.length == 1
    server.stub.CloseSession(pb.CloseSessionRequest(session_id=first))
    assert engine.evictor.host_bytes_used == image_bytes  # the fork still holds it
    server.stub.CloseSession(pb.CloseSessionRequest(session_id=child))
    assert engine.evictor.host_bytes_used == 0 and len(engine.images) == 0


def test_an_image_pushes_offloaded_kv_out_of_host_memory(vision, server_factory) -> None:
    image_bytes = 6 * 64 * 4
    server = server_factory(
        vision.extra["model_dir"],
        block_size=4,
        kv_cache_bytes=8 * 4 * 512,  # 32 tokens
        host_kv_bytes=image_bytes + 12 * 512,  # one image and 12 tokens of KV
    )
    stub = server.stub
    first = open_session(stub)
    length, _ = append_pieces(server, first, [[1, 2], make_image(6), [3]])  # 11 tokens
    generate(stub, open_session(stub), append_tokens=[9] * 24)  # pushes the first out
    residency = lambda: stub.GetSession(pb.GetSessionRequest(session_id=first)).session.residency  # noqa: E731
    assert residency() == pb.RESIDENCY_OFFLOADED
    append_pieces(server, open_session(stub), [[4], make_image(7), [5]])
    assert residency() == pb.RESIDENCY_DROPPED  # its host KV made room for the image
    assert server.engine.evictor.host_bytes_used == 2 * image_bytes
    assert first not in server.engine.runner.host_kv
    _, done = generate(stub, first, offset=length, append_tokens=[8], max_tokens=2)
    assert done.recomputed_tokens == length  # recomputed from its tokens and its image


@pytest.mark.parametrize(
    ("budget", "where"),
    [(0, "the server keeps none: --host-kv-memory is 0"), (6 * 64 * 4 - 1, "1535 bytes")],
)
def test_an_image_larger_than_the_whole_host_budget_is_too_large(
    budget: int, where: str, vision, server_factory
) -> None:
    """No room made can take it, so it is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED
    (which clients retry, and for which the shim closed every idle session holding
    images before its 429). With ``--host-kv-memory 0`` the error says the server keeps
    none (it spoke of "the other images", of which there were none)."""
    server = server_factory(
        vision.extra["model_dir"], block_size=4, kv_cache_bytes=4 << 20, host_kv_bytes=budget
    )
    session = open_session(server.stub)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.AppendImage(
            pb.AppendImageRequest(
                session_id=session, image=encode(make_image(6)), mime_type="image/png"
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "IMAGE_TOO_LARGE"
    assert caught.value.details() == (
        f"the image's embeddings ({6 * 64 * 4} bytes) exceed the whole host memory budget "
        f"({where}); send a smaller image or raise --host-kv-memory"
    )


def test_an_image_whose_encoding_runs_out_of_memory_says_so(
    vision, server_factory, monkeypatch
) -> None:
    """The vision tower's attention grows with the square of an image's patches: one that
    runs out of memory is RESOURCE_EXHAUSTED, saying what to change (it was INTERNAL, "a
    bug"), and the session is unchanged."""
    server = server_factory(vision.extra["model_dir"], block_size=4, kv_cache_bytes=4 << 20)
    model = server.engine.vision.model.model

    def get_image_features(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    monkeypatch.setattr(model, "get_image_features", get_image_features)
    session = open_session(server.stub)
    generate(server.stub, session, append_tokens=[1, 2])
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.AppendImage(
            pb.AppendImageRequest(
                session_id=session, image=encode(make_image(6)), mime_type="image/png", offset=2
            )
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "IMAGE_OUT_OF_MEMORY"
    assert "--max-image-pixels" in caught.value.details()
    assert server.stub.GetSession(pb.GetSessionRequest(session_id=session)).session.length == 2
    # Answered before the call is accepted: a truncating append changes nothing client-side
    # either (the client took OUT_OF_MEMORY as a committed call's, truncation made).
    with SalienceClient(server.target) as client, client.open_session() as held:
        held.prefill([1, 2, 3, 4])
        with pytest.raises(SalienceClientError) as refused:
            held.append_image(encode(make_image(6)), "image/png", truncate_to=2)
        assert refused.value.reason == "IMAGE_OUT_OF_MEMORY"
        assert held.length == held.info().length == held.history.length == 4


def test_images_arriving_together_are_encoded_one_at_a_time(vision, monkeypatch) -> None:
    """Each AppendImage decoded and encoded its image in a thread of its own, beside all
    the others: 24 calls of a 58 KB PNG of 4096 x 4096 pixels took the server from 1.8 to
    6.4 GB (about 190 MB each), outside --max-queue and the start-up measurement. They
    now wait their turn; each is still appended."""
    engine = vision.engine
    encode_one = engine.vision.encode
    running, most = [0], [0]
    lock = threading.Lock()

    def counting(image: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)  # long enough for the others to arrive
            return encode_one(image)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine.vision, "encode", counting)
    sessions = [open_session(vision.stub) for _ in range(6)]
    images = [encode(make_image(20 + i)) for i in range(6)]

    def append(index: int) -> int:
        request = pb.AppendImageRequest(
            session_id=sessions[index], image=images[index], mime_type="image/png"
        )
        return vision.stub.AppendImage(request).placeholder_count

    with ThreadPoolExecutor(6) as pool:
        counts = list(pool.map(append, range(6)))
    assert most[0] == 1 and all(count > 0 for count in counts)


def test_a_truncating_image_refused_for_host_memory_changes_nothing_client_side(
    vision, server_factory
) -> None:
    """HOST_MEMORY_FULL is answered before the call is accepted: the server keeps the
    session as it was, and so must the client (it took the truncation as made, then
    applied it with its next call)."""
    image_bytes = 6 * 64 * 4
    server = server_factory(
        vision.extra["model_dir"], block_size=4, kv_cache_bytes=4 << 20, host_kv_bytes=image_bytes
    )
    with (
        SalienceClient(server.target) as client,
        client.open_session() as other,
        client.open_session() as session,
    ):
        other.append_image(encode(make_image(6)), "image/png")  # the one image it takes
        session.prefill(list(range(1, 30)))
        with pytest.raises(SalienceClientError) as refused:
            session.append_image(encode(make_image(7)), "image/png", truncate_to=2)
        assert refused.value.reason == "HOST_MEMORY_FULL"
        assert session.length == session.info().length == 29
        assert session.history.length == 29


def test_an_image_call_that_gives_up_while_waiting_its_turn_encodes_nothing(
    vision, monkeypatch
) -> None:
    """A call whose deadline passed while another image was encoded still decoded and
    encoded its image once its turn came, for no one, delaying every later image."""
    engine = vision.engine
    encode_one = engine.vision.encode
    encoded: list[Any] = []

    def slow(image: Any) -> Any:
        encoded.append(image)
        time.sleep(0.5)
        return encode_one(image)

    monkeypatch.setattr(engine.vision, "encode", slow)
    requests = [
        pb.AppendImageRequest(
            session_id=open_session(vision.stub),
            image=encode(make_image(30 + i)),
            mime_type="image/png",
        )
        for i in range(2)
    ]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(vision.stub.AppendImage, requests[0])
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as late:
            vision.stub.AppendImage(requests[1], timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first.result().placeholder_count > 0
    time.sleep(0.7)  # where the late call's image would have been encoded
    assert len(encoded) == 1
