"""Sliding-window attention (Mistral, Qwen2 with use_sliding_window) against plain
transformers, on both attention backends (flash-attn through its plain-torch stand-in).
The window is 8 tokens and the sequences are far longer, so a layer that ignored its
window would move the logprobs; the first test checks that it would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import flash_reference
from tests.helpers import (
    check_sessions_against_transformers,
    random_tokens,
    reference_logprobs,
    use_flash_backend,
)
from tests.tiny_models import build_tiny_model, reference_model

ARCHITECTURES = ["qwen2-sliding", "mistral-sliding"]
FULL_ATTENTION = {
    "qwen2-sliding": {"layer_types": ["full_attention", "full_attention"]},
    "mistral-sliding": {"sliding_window": None},
}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def sliding_model(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, build_tiny_model(directory, request.param, seed=3)


def test_the_window_matters_in_these_models(sliding_model: tuple[str, Path]) -> None:
    architecture, model_dir = sliding_model
    token_ids = random_tokens(40, seed=0)
    windowed = reference_logprobs(reference_model(model_dir), token_ids)
    full_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **FULL_ATTENTION[architecture]
    ).eval()
    full = reference_logprobs(full_model, token_ids)
    assert (windowed[:8] - full[:8]).abs().max().item() < 1e-4  # inside the window: equal
    assert (windowed[20:] - full[20:]).abs().max().item() > 0.05


@pytest.mark.parametrize("backend", ["sdpa", "flash-attn"])
def test_sliding_window_sessions_equal_transformers(
    backend: str, sliding_model: tuple[str, Path], server_factory: Any, monkeypatch: Any
) -> None:
    """Chunked appends score like one forward pass, and eight sessions decoding
    together (the padded decode group) each equal transformers generate."""
    _, model_dir = sliding_model
    if backend == "flash-attn":
        use_flash_backend(monkeypatch, flash_reference.flash_attn_varlen_func, 4)
    server = server_factory(model_dir, block_size=4, kv_cache_bytes=8 << 20, max_batch_tokens=16)
    check_sessions_against_transformers(
        server.stub, reference_model(model_dir), [0, 5, 6, 30, 50], 4, 14
    )
