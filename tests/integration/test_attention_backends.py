"""The flash-attn backend inside a real model, over the plain-torch stand-in for its
kernel (no CUDA here); and the server refusing a backend that cannot run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config

from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine import sdpa_attention
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.engine import Engine
from salience_server.engine.flash_attention import FlashAttentionBackend
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.uploads import Uploads
from tests import flash_reference
from tests.helpers import (
    check_sessions_against_transformers,
    generate,
    open_session,
    random_tokens,
    reference_greedy,
    reference_logprobs,
    server_start_failure,
    use_flash_backend,
)
from tests.tiny_models import build_tiny_vision_model, reference_model


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
    runner = ModelRunner(loaded.model, 40, block_size, attention=backend)
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


@pytest.mark.parametrize("block_size", [4, 256])
def test_engine_on_the_flash_backend_equals_transformers(
    block_size: int, tiny_llama_dir: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole engine (scheduler, chunked prefill, decodes of eight sessions sharing
    forward passes) with the flash backend in place of SDPA: chunked appends score like
    one forward pass, and every session's greedy decode equals transformers generate."""
    use_flash_backend(monkeypatch, flash_reference.flash_attn_varlen_func, block_size)
    server = server_factory(
        tiny_llama_dir, block_size=block_size, kv_cache_bytes=8 << 20, max_batch_tokens=32
    )
    # a 40-token chunk > max_batch_tokens
    check_sessions_against_transformers(
        server.stub, reference_model(tiny_llama_dir), [0, 9, 10, 50, 70], 6, 12
    )


def test_server_asked_for_flash_attn_without_cuda_exits_with_one_line(tiny_llama_dir) -> None:
    stderr = server_start_failure(  # no GPU in sight, on a machine that has one too
        "--model",
        str(tiny_llama_dir),
        "--port",
        "0",
        "--attention-backend",
        "flash-attn",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert "--attention-backend flash-attn: flash-attn runs on CUDA only" in stderr


def test_without_flash_attn_the_engine_runs_sdpa_with_16_token_blocks(
    tiny_llama_dir: Path, server_factory: Any
) -> None:
    engine = server_factory(tiny_llama_dir, kv_cache_bytes=1 << 20).engine
    assert engine.block_size == 16 and engine.block_manager.block_size == 16
    assert isinstance(engine.runner.attention, sdpa_attention.SdpaBackend)


def _install_broken_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn that imports but cannot run here (as on a GPU it was not built for)."""

    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "CUDA error: no kernel image is available for execution on the device\n"
            "CUDA kernel errors might be asynchronously reported at some other API call"
        )

    use_flash_backend(monkeypatch, kernel, 16)


def test_flash_attn_that_cannot_run_falls_back_to_sdpa_at_start_under_auto(
    tiny_llama_dir: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_broken_flash_kernel(monkeypatch)
    server = server_factory(tiny_llama_dir, kv_cache_bytes=1 << 20)
    assert isinstance(server.engine.runner.attention, sdpa_attention.SdpaBackend)
    prompt = random_tokens(9, seed=1)
    tokens, _ = generate(server.stub, open_session(server.stub), append_tokens=prompt, max_tokens=8)
    assert [t.id for t in tokens] == reference_greedy(reference_model(tiny_llama_dir), prompt, 8)


def test_flash_attn_asked_for_by_name_that_cannot_run_fails_at_start(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_broken_flash_kernel(monkeypatch)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    config = EngineConfig(attention_backend="flash-attn", block_size=16, kv_cache_bytes=1 << 20)
    with pytest.raises(
        ValueError, match=r"a first forward pass failed \(RuntimeError: CUDA error: no kernel"
    ) as refused:
        Engine(loaded, config)
    assert "\n" not in str(refused.value)  # the server's last line says why


def test_the_model_keeps_its_own_layers_rather_than_the_hubs_kernels(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """transformers swaps a model's layers for kernels from the Hub unless told not to
    (downloading them on a GPU, where the check found it failing offline): the engine's
    paged attention and its exactness rest on the model's own layers."""
    for model_dir in (tiny_llama_dir, build_tiny_vision_model(tmp_path, "qwen2_vl")):
        loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
        assert loaded.model.use_kernels is False


def test_a_model_with_attention_softcapping_is_refused_at_load(tmp_path: Path) -> None:
    Gemma2Config(attn_logit_softcapping=50.0, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="softcapping"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("backend_name", ["sdpa", "flash-attn"])
def test_a_forward_pass_sends_its_integer_inputs_to_the_device_in_one_copy(
    backend_name: str, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token ids, positions, slots, block tables, lengths and row indices of a mixed
    step (a prefill chunk and two decodes) are all views of the one buffer sent."""
    sent: list[torch.Tensor] = []
    send = Uploads.send

    def counting_send(uploads: Uploads) -> None:
        send(uploads)
        sent.append(uploads.sent)

    monkeypatch.setattr(Uploads, "send", counting_send)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    backend: Any = (
        FlashAttentionBackend(flash_reference.flash_attn_varlen_func, 4, loaded.device)
        if backend_name == "flash-attn"
        else sdpa_attention.SdpaBackend(4, 40, loaded.device)
    )
    runner = ModelRunner(loaded.model, 40, 4, attention=backend)
    metadata: list[Any] = []
    build = backend.build_metadata
    backend.build_metadata = lambda *args: metadata.append(build(*args)) or metadata[-1]
    inputs: dict[str, torch.Tensor] = {}
    loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.update(kwargs), with_kwargs=True
    )
    sent.clear()  # the warm-up pass
    batch = ForwardBatch()
    batch.add_sequence(list(range(1, 10)), 0, [5, 2, 9], 4)
    batch.add_sequence([7], 6, [1, 3], 4)
    batch.add_sequence([8], 9, [4, 6, 8], 4)
    batch.logits_rows = [8, 9, 10]
    runner.execute(batch)

    assert len(sent) == 1
    [meta] = metadata
    parts = [meta.slot_mapping, inputs["input_ids"], inputs["position_ids"]]
    parts.append(inputs["logits_to_keep"])
    if backend_name == "flash-attn":
        parts += [meta.query_starts.tensor, meta.context_starts.tensor, meta.context_blocks.tensor]
        assert meta.context_blocks.length == 3 + 2 + 3  # blocks, not context tokens (26)
    else:
        group = meta.few_row_group
        parts += [group.rows.tensor, group.block_ids.tensor, group.lengths.tensor]
        parts += [group.kept.tensor, group.out_rows.tensor, group.query_lens.tensor]
        parts += [seq.block_ids.tensor for seq in meta.sequences]
    buffer = sent[0].untyped_storage().data_ptr()
    assert all(part.untyped_storage().data_ptr() == buffer for part in parts)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_a_forward_pass_makes_no_mask_of_transformers(
    architecture: str, tiny_llama_dir: Path, tiny_qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paged attention masks each sequence itself: transformers' mask making, whose
    search for packed sequences reads the positions on the host (a device sync per pass
    on CUDA), is never entered."""
    from transformers import masking_utils

    packed_searches: list[object] = []
    early_exits: list[bool] = []
    find_packed = masking_utils.find_packed_sequence_indices
    preprocess = masking_utils._preprocess_mask_arguments

    def searching(*args: Any) -> Any:
        packed_searches.append(args)
        return find_packed(*args)

    def preprocessing(*args: Any) -> Any:
        result = preprocess(*args)
        early_exits.append(result[0])
        return result

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", searching)
    monkeypatch.setattr(masking_utils, "_preprocess_mask_arguments", preprocessing)
    model_dir = tiny_llama_dir if architecture == "llama" else tiny_qwen3_dir
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    runner = ModelRunner(loaded.model, 40, 4)
    batch = ForwardBatch()
    batch.add_sequence(list(range(1, 10)), 0, [5, 2, 9], 4)
    batch.add_sequence([7], 6, [1, 3], 4)
    batch.logits_rows = [8, 9]
    runner.execute(batch)
    assert early_exits and all(early_exits) and packed_searches == []
