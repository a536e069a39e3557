"""The KV pool on a GPU: what ``--gpu-memory-utilization`` of its memory leaves beside
the model, what else the device holds, and the largest step, measured as the server
starts (``kv_pool.fit_pool``). On a CPU a stand-in reports the device's memory as CUDA's
allocator would; with SALIENCE_TEST_DEVICE=cuda the server measures the GPU itself."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from salience_client.pb import salience_pb2 as pb
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine import kv_pool
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner, kv_shape
from salience_server.engine.vision import VisionEncoder
from tests import flash_reference
from tests.architectures import build_architecture
from tests.helpers import (
    TEST_DEVICE,
    check_sessions_against_transformers,
    generate,
    open_session,
    reference_logprobs,
    use_flash_backend,
)
from tests.tiny_models import build_tiny_vision_model, reference_model

MIB = 1 << 20


class MeasuredMemory:
    """A device of ``total`` bytes of which ``used`` are in use before the pool (this
    process's model and context) and ``others`` by other processes; each piece of work
    measured holds ``peak`` bytes at most. Records the pool's size in blocks while each
    piece ran."""

    def __init__(self, total: int, used: int, peak: int, others: int = 0) -> None:
        self.total, self.used, self.peak, self.others = total, used, peak, others
        self.runner_blocks: list[int] = []
        self.runners: list[ModelRunner] = []

    def free_and_total(self) -> tuple[int, int]:
        return self.total - self.used - self.others, self.total

    def peak_of(self, work: Callable[[], Any]) -> int:
        work()
        self.runner_blocks.append(self.runners[-1].kv_caches[0][0].shape[0])
        return self.peak


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> MeasuredMemory:
    """Servers and engines started after this size their pool as on a GPU of 256 MiB
    with 100 MiB in use, where each piece of work measured takes 8 MiB."""
    memory = MeasuredMemory(total=256 * MIB, used=100 * MIB, peak=8 * MIB)
    monkeypatch.setattr(kv_pool, "device_memory", lambda device: memory)
    init = ModelRunner.__init__

    def recording_init(runner: ModelRunner, *args: Any, **kwargs: Any) -> None:
        init(runner, *args, **kwargs)
        memory.runners.append(runner)

    monkeypatch.setattr(ModelRunner, "__init__", recording_init)
    return memory


def expected_blocks(
    memory: MeasuredMemory, utilization: float, peaks: int, engine: Any, rows: int
) -> int:
    """What the pool and attention's workspace (1 / num_layers of the pool) fill of the
    room the utilization leaves beside the model's weights, in the memory free, less the
    pieces measured and the masks (bool and float32) of a chunk of ``rows`` over the
    longest context (SDPA on a CPU keeps grouped heads)."""
    free, total = memory.free_and_total()
    share = int(utilization * total) - kv_pool.model_bytes(engine.runner.model)
    masks = rows * (rows + engine.loaded.max_context) * (1 + 4)
    room = min(share, free) - peaks * memory.peak - masks
    num_layers = kv_shape(engine.loaded.model.config)[0]
    block_bytes = engine.block_size * engine.kv_bytes_per_token
    return room * num_layers // (num_layers + 1) // block_bytes


def test_the_pool_fills_what_the_measured_step_leaves_and_serves_exactly(
    tiny_llama_dir: Path, server_factory: Any, measured: MeasuredMemory, monkeypatch: Any
) -> None:
    """The runner starts with a pool that holds the largest step (64 tokens, logits at
    each), runs it under measurement, then gets the pool that fills the rest of 60% of
    the device, less the attention workspace; the server then scores and decodes as one
    transformers forward pass and generate do (a pool or workspace left at the
    provisional size would fail both)."""
    passes: list[tuple[int, int]] = []
    execute = ModelRunner.execute

    def recording_execute(runner: ModelRunner, batch: Any, *args: Any) -> Any:
        passes.append((batch.num_tokens, len(batch.logits_rows)))
        return execute(runner, batch, *args)

    monkeypatch.setattr(ModelRunner, "execute", recording_execute)
    server = server_factory(
        tiny_llama_dir,
        device="cpu",
        block_size=4,
        max_batch_tokens=64,
        gpu_memory_utilization=0.6,
    )
    engine = server.engine
    assert passes[:2] == [(2, 2), (64, 64)]  # the warm-up, then the measured step
    assert measured.runner_blocks == [64 // 4 + 1]  # the provisional pool: that step's blocks
    blocks = expected_blocks(measured, 0.6, 1, engine, rows=64)
    assert blocks > 64 // 4 + 1
    runner = engine.runner
    assert engine.block_manager.num_free == runner.num_blocks == blocks
    assert all(keys.shape[0] == values.shape[0] == blocks for keys, values in runner.kv_caches)
    assert runner.attention.workspace_blocks == blocks
    check_sessions_against_transformers(
        server.stub, reference_model(tiny_llama_dir), [0, 9, 10, 90, 110], 6, 12
    )
    assert runner.attention._workspace[0].shape[0] == blocks  # the workspace in use


def test_the_measured_step_feeds_prefills_no_longer_than_a_session(
    server_factory: Any, measured: MeasuredMemory, monkeypatch: Any, tmp_path: Path
) -> None:
    """A step of --max-batch-tokens 1100 on GPT-2's 512 learned positions: it was one
    prefill of 1100 tokens, past them (an IndexError's traceback at start; real GPT-2
    has 1,024 under the default 2,048 tokens). Prefills of 512, 512 and 76 tokens are
    measured; the server then scores and decodes as transformers does."""
    model_dir = build_architecture(tmp_path / "gpt2", "gpt2")
    passes: list[list[int]] = []
    execute = ModelRunner.execute

    def recording_execute(runner: ModelRunner, batch: Any, *args: Any) -> Any:
        passes.append([span.query_len for span in batch.sequences])
        return execute(runner, batch, *args)

    monkeypatch.setattr(ModelRunner, "execute", recording_execute)
    server = server_factory(model_dir, device="cpu", block_size=4, max_batch_tokens=1100)
    assert passes[:2] == [[2], [512, 512, 76]]  # the warm-up, then the measured step
    assert measured.runner_blocks == [1100 // 4 + 1]
    check_sessions_against_transformers(
        server.stub, reference_model(model_dir), [0, 9, 10, 90, 110], 6, 12
    )


def test_a_utilization_that_leaves_no_pool_is_refused_in_one_line(
    tiny_llama_dir: Path, measured: MeasuredMemory
) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(ValueError) as refused:  # 3% of 256 MiB: less than the step's 8 MiB
        Engine(loaded, EngineConfig(block_size=4, gpu_memory_utilization=0.03))
    assert re.fullmatch(
        r"no room for a KV pool: --gpu-memory-utilization 0\.03 of the 0\.2GiB on cpu less "
        r"the model's 0\.0GiB is 0\.0GiB, 0\.2GiB is free, and a step of --max-batch-tokens "
        r"2048 takes 0\.0\dGiB; raise --gpu-memory-utilization or lower --max-batch-tokens "
        r"\(or set --kv-cache-memory\)",
        str(refused.value),
    )


def test_a_step_that_does_not_fit_beside_the_model_is_refused_in_one_line(
    tiny_llama_dir: Path, measured: MeasuredMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured step itself ran out of memory (a --max-batch-tokens too large for the
    GPU): it went out as the allocator's stack trace."""

    def out_of_memory(work: Callable[[], Any]) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(measured, "peak_of", out_of_memory)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(ValueError) as refused:
        Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=64))
    assert str(refused.value) == (
        "the largest step (--max-batch-tokens 64, scored throughout) does not fit on cpu "
        "beside the model: lower them, or set --kv-cache-memory (CUDA out of memory. Tried "
        "to allocate 9.00 GiB)"
    )
    assert measured.runners[-1].kv_caches == []


def test_a_pool_to_measure_the_step_with_that_cannot_fit_is_refused_in_one_line(
    tiny_llama_dir: Path, measured: MeasuredMemory
) -> None:
    """The pool the largest step is measured with holds that step's tokens in blocks of
    --block-size: it was allocated unchecked (on a GPU, --block-size 100000000 ended in
    the allocator's stack trace), here 2 blocks of 128 MiB where 156 MiB are free."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(ValueError) as refused:
        Engine(loaded, EngineConfig(block_size=1 << 18))
    assert str(refused.value) == (
        "--max-batch-tokens 2048 in blocks of --block-size 262144: the pool the largest step "
        "is measured with, 0.2GiB, with the 0.12GiB attention gathers one layer's KV into, "
        "is more than the 0.2GiB free on cpu after loading the model; lower them"
    )
    assert measured.runners == []


def test_the_pool_leaves_what_other_processes_hold(
    tiny_llama_dir: Path, measured: MeasuredMemory
) -> None:
    """Another process (a replica sharing the GPU) holds 100 MiB: the pool fits in the
    56 MiB free, less the step, though 0.9 of the device less the model would be 230."""
    measured.others = 100 * MIB
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    engine = Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=64))
    blocks = expected_blocks(measured, 0.9, 1, engine, rows=64)
    assert engine.runner.num_blocks == blocks
    pool_bytes = blocks * engine.block_size * engine.kv_bytes_per_token
    num_layers = kv_shape(loaded.model.config)[0]
    with_workspace = pool_bytes * (num_layers + 1) / num_layers
    assert 47 * MIB < with_workspace <= 48 * MIB  # the 56 MiB free less the step's 8


def test_a_pool_flash_attn_reads_in_place_keeps_no_workspace_room(
    tiny_llama_dir: Path, measured: MeasuredMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paged flash-attn gathers nothing: the room is the pool's alone, and a chunk over
    a long context adds no masks."""
    use_flash_backend(monkeypatch, flash_reference.flash_attn_varlen_func, 256)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    engine = Engine(loaded, EngineConfig(block_size=256, max_batch_tokens=64))
    share = int(0.9 * measured.total) - kv_pool.model_bytes(engine.runner.model)
    room = min(share, measured.total - measured.used) - measured.peak
    block_bytes = engine.block_size * engine.kv_bytes_per_token
    assert engine.runner.attention.paged and engine.runner.num_blocks == room // block_bytes


def test_a_pool_that_no_longer_fits_as_it_is_allocated_is_refused_in_one_line(
    tiny_llama_dir: Path, measured: MeasuredMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process took the memory between the measurement and the allocation."""
    allocate = ModelRunner._allocate_pool

    def failing_the_second(runner: ModelRunner) -> None:
        if measured.runner_blocks:  # after the measured step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 MiB")
        allocate(runner)

    monkeypatch.setattr(ModelRunner, "_allocate_pool", failing_the_second)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(ValueError, match=r"^the KV pool of 0\.1GiB did not fit: the device's"):
        Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=64))
    assert measured.runners[-1].kv_caches == []


def test_a_set_kv_cache_memory_is_not_measured(
    tiny_llama_dir: Path, measured: MeasuredMemory
) -> None:
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    engine = Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=MIB))
    assert measured.runner_blocks == []
    assert engine.block_manager.num_free * engine.block_size * engine.kv_bytes_per_token == MIB


def test_a_vision_model_measures_an_image_of_the_largest_size_too(
    tmp_path: Path, measured: MeasuredMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images are encoded beside the steps: the room for the pool leaves the largest
    image's encoding too, an image as large as the processor keeps (112 x 112 pixels
    here, under --max-image-pixels)."""
    model_dir = build_tiny_vision_model(tmp_path, "qwen2_vl")
    sizes: list[tuple[int, int]] = []
    encode = VisionEncoder.encode

    def recording_encode(encoder: VisionEncoder, image: Any) -> Any:
        sizes.append(image.size)
        return encode(encoder, image)

    monkeypatch.setattr(VisionEncoder, "encode", recording_encode)
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    engine = Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=32))
    assert sizes == [(112, 112)]
    assert len(measured.runner_blocks) == 2
    assert engine.runner.num_blocks == expected_blocks(measured, 0.9, 2, engine, rows=32)
    small = Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=32, max_image_pixels=3000))
    assert sizes[-1] == (math.isqrt(3000),) * 2 and small.runner.num_blocks > 0


@pytest.mark.skipif(TEST_DEVICE == "cpu", reason="measures a GPU's memory (scripts/gpu_check.sh)")
def test_a_gpu_pool_is_sized_from_the_measured_step(
    tiny_llama_dir: Path, server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the GPU itself: the step measured holds at least its float32 logprobs (2048
    rows of the vocabulary), the pool outgrows the provisional one within 5% of the
    GPU (other test processes may share it), and the server is exact."""
    peaks: list[int] = []
    measure = kv_pool.device_memory

    def spying(device: torch.device) -> Any:
        memory = measure(device)
        assert isinstance(memory, kv_pool.CudaMemory)
        peak_of = memory.peak_of

        def recorded_peak_of(work: Callable[[], Any]) -> int:
            peaks.append(peak_of(work))
            return peaks[-1]

        memory.peak_of = recorded_peak_of  # type: ignore[method-assign]
        return memory

    monkeypatch.setattr(kv_pool, "device_memory", spying)
    _, total = torch.cuda.mem_get_info(torch.device(TEST_DEVICE))
    server = server_factory(
        tiny_llama_dir, block_size=16, kv_cache_bytes=0, gpu_memory_utilization=0.05
    )
    engine = server.engine
    assert len(peaks) == 1 and peaks[0] >= 2048 * engine.vocab_size * 4
    pool_bytes = engine.runner.num_blocks * engine.block_size * engine.kv_bytes_per_token
    assert 2048 // 16 + 1 < engine.runner.num_blocks and pool_bytes < 0.05 * total
    check_sessions_against_transformers(
        server.stub, reference_model(tiny_llama_dir), [0, 9, 10, 90, 110], 6, 12
    )


def test_the_least_pool_holds_a_prompt_token_and_the_one_decoded(
    tiny_llama_dir, server_factory
) -> None:
    """A budget under two tokens' KV (--block-size 1 --kv-cache-memory 1) held one
    one-token block, which the start-up pass of two tokens overran: the server refused
    to start, asking whether the architecture was one it could run."""
    server = server_factory(tiny_llama_dir, block_size=1, kv_cache_bytes=1)
    stub = server.stub
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).max_context == 2
    oracle = reference_model(tiny_llama_dir)
    for prompt in ([17], [200]):  # the second session evicts the first
        tokens, done = generate(
            stub, open_session(stub), append_tokens=prompt, max_tokens=5, logprobs_ranges=[(1, 2)]
        )
        want = reference_logprobs(oracle, prompt)[0]
        assert [t.id for t in tokens] == [int(want.argmax())]
        assert abs(tokens[0].sampled_logprob - want.max().item()) < 1e-4
        assert (done.finish_reason, done.total_tokens) == (4, 2)  # CONTEXT
