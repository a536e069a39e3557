"""Architectures that load in transformers but that paged attention cannot serve right
are refused at start, in one line naming why (each was served wrong, or failed with a
stack trace): keys and values of another shape than the pool's (multi-head latent
attention; JetMoE's keys repeated per expert), two attention calls per layer
(DiffLlama), layers of different shapes (Gemma 4), layers that keep a recurrent
state beside their attention (Falcon-H1), and ALiBi (Falcon's option, MPT's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model
from tests.architectures import REFUSED_ARCHITECTURES, build_architecture
from tests.helpers import server_start_failure

REASONS = {
    "deepseek-v3": r"DeepseekV3ForCausalLM: layer 0 attends over keys of 4 heads of 24, where "
    r"the KV pool, sized from the config, holds 2 heads of 8: .*multi-head latent attention",
    "jetmoe": r"JetMoeForCausalLM: layer 0 attends over keys of 4 heads of 16, where the KV "
    r"pool, sized from the config, holds 2 heads of 16",
    "diffllama": r"DiffLlamaForCausalLM: the model's layers \[0, 1\] attend more than once",
    "falcon-h1": r": its layers keep a recurrent state \(state-space or linear "
    r"attention",
    "falcon-alibi": r" uses ALiBi position biases",
    "mpt": r" uses ALiBi position biases",
    "gemma4-text": r"its layers' keys and values are not all of one shape \('head_dim' is a "
    r"per-layer attribute",
}


def _start(model_dir: Path) -> Engine:
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    return Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))


@pytest.mark.parametrize("name", sorted(REFUSED_ARCHITECTURES))
def test_an_architecture_served_wrong_is_refused_at_start(name: str, tmp_path: Path) -> None:
    assert set(REASONS) == set(REFUSED_ARCHITECTURES)
    model_dir = build_architecture(tmp_path, name)
    with pytest.raises(ValueError, match=REASONS[name]) as refused:
        _start(model_dir)
    assert "\n" not in str(refused.value)


def test_the_server_refuses_it_in_one_line(tmp_path: Path) -> None:
    """The command exits 1 with the reason, no stack trace (DeepSeek-V3's was one)."""
    model_dir = build_architecture(tmp_path, "deepseek-v3")
    stderr = server_start_failure("--model", str(model_dir), "--port", "0")
    assert "multi-head latent attention" in stderr.splitlines()[-1]


def test_any_failure_of_the_first_forward_pass_is_one_line(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that fails as it first runs (a RuntimeError deep in its layers ended in a
    stack trace) is refused with the error's first line."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))

    def failing(hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("The size of tensor a (32) must match the size of tensor b (8)\nmore")

    monkeypatch.setattr(loaded.model.model.norm, "forward", failing)
    with pytest.raises(
        ValueError,
        match=r"LlamaForCausalLM: a first forward pass failed "
        r"\(RuntimeError: The size of tensor a \(32\) must match the size of "
        r"tensor b \(8\)\)",
    ) as refused:
        Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert "\n" not in str(refused.value)


def test_a_transformers_without_the_recurrent_cache_class_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recurrent-state check reads a class transformers added in 5.x (the project asks
    for any 5.x): without it, a plain model still loads (the import failed every load)."""
    import transformers.cache_utils

    monkeypatch.delattr(transformers.cache_utils, "LinearAttentionCacheLayerMixin")
    engine = _start(build_architecture(tmp_path, "granite"))
    assert engine.max_context > 0
