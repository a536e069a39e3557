"""Bearer-token auth on the gRPC service, through raw stubs, both clients and the shim."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client import AsyncSalienceClient, SalienceClient, SalienceClientError
from salience_client.pb import salience_pb2 as pb
from salience_server.config import ServerConfig
from salience_server.http.config import ShimConfig
from tests.helpers import error_reason
from tests.shim_support import start_shim

KEY = "s3cret"


@pytest.fixture(scope="module")
def guarded(tiny_llama_dir):
    from tests.conftest import start_server

    server = start_server(str(tiny_llama_dir), api_key=KEY, block_size=4, kv_cache_bytes=4 << 20)
    yield server
    server.stop()


def test_calls_without_the_key_are_unauthenticated(guarded) -> None:
    bad = ("Bearer wrong", f"Basic {KEY}", f"Bearer{KEY}", f"Bearer {KEY}x", KEY)
    for metadata in (None, *((("authorization", value),) for value in bad)):
        with pytest.raises(grpc.RpcError) as caught:
            guarded.stub.OpenSession(pb.OpenSessionRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(caught.value) == "UNAUTHENTICATED"
        with pytest.raises(grpc.RpcError) as caught:
            list(guarded.stub.Generate(pb.GenerateRequest(session_id="x"), metadata=metadata))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The scheme's case is free (HTTP's rule); the key's is not.
    for value in (f"bearer {KEY}", f"BEARER  {KEY}"):
        guarded.stub.OpenSession(pb.OpenSessionRequest(), metadata=(("authorization", value),))
    with pytest.raises(grpc.RpcError):
        guarded.stub.OpenSession(
            pb.OpenSessionRequest(), metadata=(("authorization", f"Bearer {KEY.upper()}"),)
        )
    # Health stays open.
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest()).status
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_clients_with_the_key_work(guarded) -> None:
    with SalienceClient(guarded.target, api_key=KEY) as client, client.open_session() as session:
        events = list(session.generate([1, 2, 3], max_tokens=3))
        assert events[-1].total_tokens == session.length > 3
    with SalienceClient(guarded.target) as client, pytest.raises(SalienceClientError) as caught:
        client.open_session()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def run() -> int:
        async with AsyncSalienceClient(guarded.target, api_key=KEY) as client:
            session = await client.open_session()
            return len([e async for e in session.generate([4, 5], max_tokens=2)])

    assert asyncio.run(run()) >= 2


def test_the_shim_passes_its_key_to_the_server(guarded) -> None:
    shim = start_shim(guarded.target, api_key=KEY)
    try:
        client = shim.client()
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            shim.client(api_key="wrong").models.list()
        for value, status in ((f"bearer {KEY}", 200), (f"Basic {KEY}", 401)):
            response = httpx.get(f"{shim.base_url}/models", headers={"authorization": value})
            assert response.status_code == status, value
    finally:
        shim.stop()


def test_unparsable_calls_without_the_key_are_unauthenticated(guarded) -> None:
    """Auth is checked before the request's bytes: a stranger learns nothing of them."""
    call = guarded.channel.unary_unary("/salience.v1.Salience/OpenSession")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\xff\xff\xff", timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\xff\xff\xff", timeout=30, metadata=(("authorization", f"Bearer {KEY}"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "MALFORMED_REQUEST"


def test_browser_pages_of_allowed_origins_may_call_the_shim(guarded) -> None:
    """``--cors-origin``: a browser's preflight (which carries no API key) is answered for
    an allowed origin, and answers carry the origin; other origins get no such headers,
    and without the flag no origin does."""
    app_origin = "https://app.example"
    preflight = {
        "origin": app_origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    key = {"authorization": f"Bearer {KEY}"}
    shim = start_shim(guarded.target, api_key=KEY, cors_origins=(app_origin,))
    plain = start_shim(guarded.target, api_key=KEY)
    try:
        url = f"{shim.base_url}/chat/completions"
        response = httpx.options(url, headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == app_origin
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        response = httpx.get(f"{shim.base_url}/models", headers={"origin": app_origin, **key})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == app_origin
        # The key is still required of the call itself.
        response = httpx.get(f"{shim.base_url}/models", headers={"origin": app_origin})
        assert response.status_code == 401
        other = {**preflight, "origin": "https://evil.example"}
        assert "access-control-allow-origin" not in httpx.options(url, headers=other).headers
        response = httpx.get(f"{plain.base_url}/models", headers={"origin": app_origin, **key})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        response = httpx.options(f"{plain.base_url}/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    finally:
        shim.stop()
        plain.stop()
    with pytest.raises(ValueError, match="not \\* or scheme://host"):
        ShimConfig(cors_origins=("app.example",))
    for never_sent in ("https://app.example/", "https://App.example", "https://*.example"):
        with pytest.raises(ValueError, match="not \\* or scheme://host"):
            ShimConfig(cors_origins=(never_sent,))


def test_a_key_headers_cannot_carry_is_refused_at_start() -> None:
    """A key past visible ASCII started a server and a shim that no call could reach: the
    shim answered 500 with grpc's reprs, the client INTERNAL "Invalid metadata"."""
    for key in ("clé", "two words", "tab\tkey"):
        for make in (ServerConfig, ShimConfig):
            with pytest.raises(ValueError, match=r"--api-key \(or \$SALIENCE_API_KEY\) must be"):
                make(api_key=key)
    assert ServerConfig(api_key="sk-1.2_3~x").api_key == "sk-1.2_3~x"
