"""Architectures beyond the Llama family, served through paged attention, against
transformers' own forward of the same tokens (float32, within 1e-4): chunked appends
crossing KV blocks and sliding windows score like one forward pass, eight sessions
decoding together each equal ``generate``, and a fork and a rewind score like the
sequences they hold."""

from __future__ import annotations

import random
from collections.abc import Callable
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

WINDOWED = sorted(name for name, (_, config) in ARCHITECTURES.items() if "sliding_window" in config)
"""The architectures with a sliding window, served on flash-attn's backend too (the
Llama-family tests cover that backend otherwise)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """Builds an architecture once per module: (model directory, transformers' model)."""
    models: dict[str, tuple[Path, Any]] = {}

    def build(name: str) -> tuple[Path, Any]:
        if name not in models:
            model_dir = build_architecture(tmp_path_factory.mktemp(name), name)
            models[name] = model_dir, reference_model(model_dir)
        return models[name]

    return build


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


def _check_served(model_dir: Path, oracle: Any, server_factory: Any) -> None:
    server = server_factory(model_dir, block_size=4, kv_cache_bytes=8 << 20, max_batch_tokens=16)
    check_sessions_against_transformers(server.stub, oracle, [0, 5, 6, 30, 50], 4, 14)
    check_fork_and_rewind(server.stub, oracle)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_served_architectures_equal_transformers(
    name: str, built: Callable[[str], tuple[Path, Any]], server_factory: Any
) -> None:
    """On SDPA, what ``auto`` and ``sdpa`` pick on a CPU."""
    _check_served(*built(name), server_factory)


@pytest.mark.parametrize("name", WINDOWED)
def test_windowed_architectures_equal_transformers_on_flash_attn(
    name: str,
    built: Callable[[str], tuple[Path, Any]],
    server_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On flash-attn's backend (through its plain-torch stand-in), which windows its
    attention itself."""
    use_flash_backend(monkeypatch, flash_reference.flash_attn_varlen_func, 4)
    _check_served(*built(name), server_factory)


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
