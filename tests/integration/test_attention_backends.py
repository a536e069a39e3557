"""The flash-attn backend inside a real model, over the plain-torch stand-in for its
kernel (no CUDA here); and the server refusing a backend that cannot run."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salience_server.config import ModelConfig
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.flash_attention import FlashAttentionBackend
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner
from tests import flash_reference
from tests.helpers import reference_logprobs
from tests.tiny_models import reference_model


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [4, 256])
def test_model_runner_with_the_flash_backend_equals_one_forward_pass(
    architecture: str, block_size: int, tiny_llama_dir: Path, tiny_qwen3_dir: Path
) -> None:
    """Two steps through a real model: prefills of two sessions, then a chunk of one,
    a decode of the other and a third session's prefill; every logits row equals the
    plain forward pass over each session's whole sequence."""
    model_dir = tiny_llama_dir if architecture == "llama" else tiny_qwen3_dir
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    backend = FlashAttentionBackend(
        flash_reference.flash_attn_varlen_func, block_size, loaded.device
    )
    runner = ModelRunner(loaded.model, 40, block_size, 512, attention=backend)
    rng = random.Random(5)
    sequences = {name: [rng.randrange(256) for _ in range(40)] for name in "abc"}
    tables = {name: list(range(i * 10, (i + 1) * 10))[::-1] for i, name in enumerate("abc")}
    oracle = reference_model(model_dir)
    steps = [
        [("a", 0, 10), ("b", 0, 20)],
        [("a", 10, 15), ("b", 20, 21), ("c", 0, 3)],
    ]
    for step in steps:
        batch = ForwardBatch()
        for name, start, end in step:
            batch.add_sequence(sequences[name][start:end], start, tables[name], block_size)
        batch.logits_rows = list(range(batch.num_tokens))
        logprobs = torch.log_softmax(runner.execute(batch).logits.float(), dim=-1)
        row = 0
        for name, start, end in step:
            want = reference_logprobs(oracle, sequences[name][:end])[start:end]
            assert (logprobs[row : row + end - start] - want).abs().max().item() < 1e-4
            row += end - start


def test_server_asked_for_flash_attn_without_cuda_exits_with_one_line(tiny_llama_dir) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "salience_server",
            "--model",
            str(tiny_llama_dir),
            "--port",
            "0",
            "--attention-backend",
            "flash-attn",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "--attention-backend flash-attn: flash-attn runs on CUDA only" in result.stderr
    assert "Traceback" not in result.stderr
