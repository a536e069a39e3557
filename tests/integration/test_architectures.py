"""Architectures beyond the Llama family, served through paged attention, against
transformers' own forward of the same tokens (float32, within 1e-4): chunked appends
crossing KV blocks and sliding windows score like one forward pass, eight sessions
decoding together each equal ``generate``, and a fork and a rewind score like the
sequences they hold."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from salience_client.pb import salience_pb2 as pb
from tests import flash_reference
from tests.architectures import ARCHITECTURES, LONGROPE_ORIGINAL, build_architecture
from tests.helpers import (
    U32_MAX,
    check_sessions_against_transformers,
    generate,
    open_session,
    reference_logprobs,
    use_flash_backend,
)
from tests.tiny_models import reference_model


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    """(name, model directory, transformers' model of it)."""
    model_dir = build_architecture(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, model_dir, reference_model(model_dir)


def _scored(stub: Any, session_id: str, token_ids: list[int], start: int, **kwargs: Any) -> Any:
    """Appends ``token_ids[start:]`` at ``start``: the logprobs of those tokens."""
    tokens, _ = generate(
        stub,
        session_id,
        append_tokens=token_ids[start:],
        offset=start,
        logprobs_ranges=[(start, U32_MAX)],
        **kwargs,
    )
    return torch.tensor([token.sampled_logprob for token in tokens])


def _wanted(oracle: Any, token_ids: list[int], start: int) -> torch.Tensor:
    logprobs = reference_logprobs(oracle, token_ids)
    return logprobs[torch.arange(start - 1, len(token_ids) - 1), torch.tensor(token_ids[start:])]


def check_fork_and_rewind(stub: Any, oracle: Any) -> None:
    """A child forked at 20 tokens and its parent each go on their own way; then the
    parent rewinds to 12 and takes other tokens: each scores as its whole sequence."""
    rng = random.Random(5)
    shared = [rng.randrange(256) for _ in range(20)]
    parent = open_session(stub)
    generate(stub, parent, append_tokens=shared)
    child = stub.ForkSession(pb.ForkSessionRequest(session_id=parent)).session_id
    for session_id in (child, parent):
        token_ids = shared + [rng.randrange(256) for _ in range(15)]
        got = _scored(stub, session_id, token_ids, 20)
        assert (got - _wanted(oracle, token_ids, 20)).abs().max().item() < 1e-4
    token_ids = shared[:12] + [rng.randrange(256) for _ in range(18)]
    got = _scored(stub, parent, token_ids, 12, truncating=True)
    assert (got - _wanted(oracle, token_ids, 12)).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flash-attn"])
def test_served_architectures_equal_transformers(
    backend: str,
    architecture: tuple[str, Path, Any],
    server_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On SDPA (what ``auto`` and ``sdpa`` pick on a CPU), and on flash-attn's backend
    (through its plain-torch stand-in) for the models with a sliding window."""
    name, model_dir, oracle = architecture
    if backend == "flash-attn":
        if "sliding_window" not in ARCHITECTURES[name][1]:
            pytest.skip("no sliding window: the Llama-family tests cover this backend")
        use_flash_backend(monkeypatch, flash_reference.flash_attn_varlen_func, 4)
    server = server_factory(model_dir, block_size=4, kv_cache_bytes=8 << 20, max_batch_tokens=16)
    check_sessions_against_transformers(server.stub, oracle, [0, 5, 6, 30, 50], 4, 14)
    check_fork_and_rewind(server.stub, oracle)


def test_a_longrope_model_holds_no_more_than_its_original_context(
    tmp_path: Path, server_factory: Any
) -> None:
    """Past its original positions, LongRoPE rotates the whole sequence by its long
    factors (in transformers' forward over it), which keys already cached cannot
    follow: served up to its 512 positions, a session that grew past 64 tokens scored
    far from transformers. Sessions hold the original context."""
    model_dir = build_architecture(tmp_path, "phi3-longrope")
    server = server_factory(model_dir, block_size=4, kv_cache_bytes=8 << 20)
    opened = server.stub.OpenSession(pb.OpenSessionRequest())
    assert opened.max_context == LONGROPE_ORIGINAL
    token_ids = [random.Random(3).randrange(256) for _ in range(LONGROPE_ORIGINAL)]
    generate(server.stub, opened.session_id, append_tokens=token_ids[:1])
    got = _scored(server.stub, opened.session_id, token_ids, 1)
    assert (got - _wanted(reference_model(model_dir), token_ids, 1)).abs().max().item() < 1e-4
