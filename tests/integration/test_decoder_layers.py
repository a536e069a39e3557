"""The lean decoder-layer forward (``decoder_layers``) gives transformers' layers' outputs
bit for bit, through the model runner, in float32 and bfloat16, for each architecture it
takes; the others keep transformers' forward."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from salience_server.config import ModelConfig
from salience_server.engine import decoder_layers
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner
from tests.tiny_models import build_tiny_model

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: build_tiny_model(tmp_path_factory.mktemp(name), name, seed=3)
        for name in ("llama", "qwen3", "qwen2-sliding", "mistral-sliding")
    }


def _steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Two steps: prefills of two sessions (one past the sliding window), then a decode
    of one beside a chunk of the other; every row's logits."""
    rng = random.Random(7)
    tokens = {name: [rng.randrange(256) for _ in range(30)] for name in "ab"}
    tables = {"a": list(range(0, 10)), "b": list(range(10, 20))}
    logits = []
    for step in ([("a", 0, 12), ("b", 0, 25)], [("a", 12, 13), ("b", 25, 30)]):
        batch = ForwardBatch()
        for name, start, end in step:
            batch.add_sequence(tokens[name][start:end], start, tables[name], BLOCK_SIZE)
        batch.logits_rows = list(range(batch.num_tokens))
        logits.append(runner.execute(batch).logits)
    return logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("architecture", ["llama", "qwen3", "qwen2-sliding"])
def test_the_lean_layers_equal_transformers_layers_bit_for_bit(
    model_dirs: dict[str, Path], architecture: str, dtype: str
) -> None:
    loaded = load_model(ModelConfig(model=str(model_dirs[architecture]), dtype=dtype, device="cpu"))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in loaded.model.named_parameters():
        if "norm" in name:  # initialised to ones, which hides how a norm rounds
            noise = torch.randn(parameter.shape, generator=generator) * 0.5
            parameter.data += noise.to(parameter.dtype)
    runner = ModelRunner(loaded.model, 20, BLOCK_SIZE)
    layers = loaded.model.model.layers
    assert all(layer.forward.__func__ is decoder_layers.forward for layer in layers)
    # Stacked by the runner (fused_linears): the lean forward multiplies each group as one.
    assert all(layer._salience_qkv and layer._salience_gate_up for layer in layers)
    # Queries and keys rotated as one, except where a per-head norm (Qwen3's) comes first.
    assert all(layer._salience_rotates_stacked == (architecture != "qwen3") for layer in layers)
    lean = _steps(runner)
    for layer in layers:
        del layer.forward  # transformers' own again
    assert all(layer.forward.__func__ is type(layer).forward for layer in layers)
    for got, want in zip(lean, _steps(runner), strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_other_architectures_keep_transformers_forward(model_dirs: dict[str, Path]) -> None:
    loaded = load_model(ModelConfig(model=str(model_dirs["mistral-sliding"]), device="cpu"))
    ModelRunner(loaded.model, 20, BLOCK_SIZE)
    assert all("forward" not in layer.__dict__ for layer in loaded.model.model.layers)
