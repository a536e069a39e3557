"""How large the KV block pool is: its block size and its number of blocks.

On CUDA, unless ``--kv-cache-memory`` sets it, the pool takes what is left of
``--gpu-memory-utilization`` of the GPU's memory once the model is loaded and the step
that takes the most memory has run once and been measured (``fit_pool``), as vLLM
sizes its cache: the runner starts with a pool that holds that step alone, runs it,
then gets the pool it keeps.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from salience_server.config import EngineConfig
from salience_server.engine import cpu_matmul, filters, paged_attention, scoring
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.errors import SalienceError, out_of_memory, release_cached_memory
from salience_server.engine.loader import LoadedModel
from salience_server.engine.model_runner import (
    ModelRunner,
    kv_bytes_per_token,
    kv_dtype,
    kv_shape,
)
from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import Uploads

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30
MIN_POOL_TOKENS = 2
"""The least a pool holds: a prompt's token and the one decoded after it (the start-up
pass feeds two: with --block-size 1, a one-block pool failed it, "is the architecture
one Salience can run?")."""
PROFILED_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05)
"""What the measured step's drawn rows are filtered with: every filter at once."""


class DeviceMemory(Protocol):
    """The device's memory, as the pool's size is measured from it."""

    def free_and_total(self) -> tuple[int, int]:
        """Bytes free on the device now (this process's cached blocks given back
        first) and its total."""
        ...

    def peak_of(self, work: Callable[[], Any]) -> int:
        """Runs ``work``; the most bytes it held at once beyond what was held before."""
        ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free_and_total(self) -> tuple[int, int]:
        # Blocks this process's caching allocator keeps from freed tensors (an engine
        # stopped before, the loading's temporaries) count as used in the driver's
        # figure: hand them back first, or each engine of a process gets less.
        torch.cuda.synchronize(self.device)
        _release_unreferenced()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def peak_of(self, work: Callable[[], Any]) -> int:
        torch.cuda.synchronize(self.device)
        release_cached_memory()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        work()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def _release_unreferenced() -> None:
    """Frees what only reference cycles keep (an engine stopped before: its model and
    runner refer to each other through hooks) and hands the cached blocks back."""
    gc.collect()
    release_cached_memory()


def device_memory(device: torch.device) -> DeviceMemory | None:
    """What measures ``device``'s memory where the pool is sized from a measured step
    (CUDA); None where the pool has a fixed default (a CPU's)."""
    return CudaMemory(device) if device.type == "cuda" else None


@dataclass(frozen=True)
class PoolSize:
    block_size: int
    """Tokens per block."""
    num_blocks: int
    bytes_per_token: int
    """Keys and values of one token across all layers."""
    provisional: bool = False
    """A pool for the start-up passes only, which ``fit_pool`` replaces."""

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size


def size_pool(loaded: LoadedModel, config: EngineConfig) -> PoolSize:
    """The pool the configured (or default) budget holds, in blocks of the configured (or
    the attention backend's default) size."""
    pool_dtype = kv_dtype(loaded.device, loaded.dtype)
    bytes_per_token = kv_bytes_per_token(loaded.model.config, pool_dtype)
    block_size = config.block_size or paged_attention.default_block_size(
        config.attention_backend, loaded.device, loaded.dtype, kv_shape(loaded.model.config)[2]
    )
    if not config.kv_cache_bytes and device_memory(loaded.device) is not None:
        # The measured step's tokens, in blocks from block 0, and one more.
        num_blocks = -(-config.max_batch_tokens // block_size) + 1
        size = PoolSize(block_size, num_blocks, bytes_per_token, provisional=True)
        what = (
            f"--max-batch-tokens {config.max_batch_tokens} in blocks of --block-size "
            f"{block_size}: the pool the largest step is measured with, "
            f"{_gib(num_blocks * size.block_bytes)}"
        )
        _check_free(loaded, num_blocks * size.block_bytes, what, "lower them")
        return size
    budget = _budget_bytes(loaded, config)
    min_blocks = -(-MIN_POOL_TOKENS // block_size)
    num_blocks = max(min_blocks, budget // (bytes_per_token * block_size))
    size = PoolSize(block_size, num_blocks, bytes_per_token)
    if budget < min_blocks * size.block_bytes:
        # Above the budget: its memory was taken unchecked (--block-size 100000000
        # filled the host's memory as the pool was zeroed).
        least = min_blocks * size.block_bytes
        what = f"the least pool, {min_blocks} block(s) of --block-size {block_size} ({_gib(least)})"
        _check_free(loaded, least, what)
        log.warning(
            "the KV budget (%d bytes) is less than the least pool, %d block%s of %d "
            "token%s: the pool holds that",
            budget,
            min_blocks,
            "" if min_blocks == 1 else "s",
            block_size,
            "" if block_size == 1 else "s",
        )
    log.info(
        "KV pool: %d blocks of %d tokens (%.1f MiB)",
        num_blocks,
        block_size,
        num_blocks * size.block_bytes / 2**20,
    )
    return size


def _budget_bytes(loaded: LoadedModel, config: EngineConfig) -> int:
    if not config.kv_cache_bytes:
        return CPU_DEFAULT_KV_BYTES
    what = f"--kv-cache-memory {_gib(config.kv_cache_bytes)}"
    _check_free(loaded, config.kv_cache_bytes, what)
    return config.kv_cache_bytes


def _check_free(loaded: LoadedModel, pool_bytes: int, what: str, fix: str = "lower it") -> None:
    """ValueError, naming ``what`` sets the size and ``fix``, where a pool of
    ``pool_bytes`` and the workspace beside it are more than the device's free memory
    (the allocation failed with a stack trace)."""
    free = _free_bytes(loaded.device)
    # Attention gathers one layer's KV at a time into a workspace of that size.
    workspace = pool_bytes // kv_shape(loaded.model.config)[0]
    if pool_bytes + workspace > free:
        raise ValueError(
            f"{what}, with the {workspace / 2**30:.2f}GiB attention gathers one layer's KV "
            f"into, is more than the {_gib(free)} free on {loaded.device} after loading "
            f"the model; {fix}"
        )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f}GiB"


def _free_bytes(device: torch.device) -> int:
    """Memory free for the pool on ``device`` now."""
    memory = device_memory(device)
    return cpu_matmul.available_memory() if memory is None else memory.free_and_total()[0]


def fit_pool(
    pool: PoolSize,
    runner: ModelRunner,
    config: EngineConfig,
    *,
    max_context: int,
    uses_mrope: bool,
    vision: Any = None,
) -> PoolSize:
    """Replaces the runner's provisional ``pool`` with the largest that fits, beside
    the most one step takes (measured, ``profile_step``, with what attention adds for a
    chunk over a context of ``max_context``) while an image of the largest size is
    encoded (``vision``, a VisionEncoder; images are encoded beside the steps): within
    ``--gpu-memory-utilization`` of the device's memory less the model's weights (replicas
    sharing a GPU each take their share), and within the memory free."""
    memory = device_memory(runner.device)
    assert memory is not None and pool.provisional
    step, image = _measure(memory, runner, config, uses_mrope, vision, max_context)
    dtype = runner.kv_caches[0][0].dtype
    rows = config.max_batch_tokens
    step += runner.attention.chunk_bytes(rows, max_context, runner.model.config, dtype)
    runner.release_pool()
    free, total = memory.free_and_total()
    held = model_bytes(runner.model)
    share = int(config.gpu_memory_utilization * total) - held
    room = min(share, free) - step - image
    num_layers = kv_shape(runner.model.config)[0]
    if runner.attention.has_workspace:  # 1 / num_layers of the pool beside it
        room = room * num_layers // (num_layers + 1)
    num_blocks = room // pool.block_bytes
    gib = 2**30
    sizes = (
        f"--gpu-memory-utilization {config.gpu_memory_utilization:g} of the "
        f"{total / gib:.1f}GiB on {runner.device} less the model's {held / gib:.1f}GiB is "
        f"{share / gib:.1f}GiB, {free / gib:.1f}GiB is free, and a step of "
        f"--max-batch-tokens {rows} takes {step / gib:.2f}GiB"
        + (f" (an image {image / gib:.2f}GiB)" if vision is not None else "")
    )
    if num_blocks * pool.block_size < MIN_POOL_TOKENS:
        raise ValueError(
            f"no room for a KV pool: {sizes}; raise --gpu-memory-utilization or lower "
            "--max-batch-tokens (or set --kv-cache-memory)"
        )
    try:
        runner.resize_pool(num_blocks)
    except Exception as error:
        if not out_of_memory(error):
            raise
        failed = True  # out of the handler, which holds what was allocated
    else:
        failed = False
    if failed:
        runner.release_pool()
        raise ValueError(
            f"the KV pool of {num_blocks * pool.block_bytes / gib:.1f}GiB did not fit: the "
            "device's free memory shrank as it was sized (another process starting?); "
            "start again, or set --gpu-memory-utilization or --kv-cache-memory"
        )
    log.info(
        "KV pool: %d blocks of %d tokens (%.1f GiB): %s",
        num_blocks,
        pool.block_size,
        num_blocks * pool.block_bytes / gib,
        sizes,
    )
    return PoolSize(pool.block_size, num_blocks, pool.bytes_per_token)


def _measure(
    memory: DeviceMemory,
    runner: ModelRunner,
    config: EngineConfig,
    uses_mrope: bool,
    vision: Any,
    max_context: int,
) -> tuple[int, int]:
    """The most memory the largest step (of prefills of at most ``max_context`` tokens)
    and the largest image's encoding hold; a step or an image that does not fit even
    with no pool beside it is a ValueError."""
    try:
        step = memory.peak_of(
            lambda: profile_step(runner, config, uses_mrope=uses_mrope, max_context=max_context)
        )
        image = 0
        if vision is not None:
            largest = vision.largest_image(config.max_image_pixels)
            image = memory.peak_of(lambda: vision.encode(largest))
    except (SalienceError, torch.OutOfMemoryError) as error:
        if isinstance(error, SalienceError) and error.reason not in (
            "OUT_OF_MEMORY",
            "IMAGE_OUT_OF_MEMORY",
        ):
            raise
        failed = str(error)
    else:
        return step, image
    runner.release_pool()  # out of the handler, which holds the pass's memory
    release_cached_memory()
    raise ValueError(
        f"the largest step (--max-batch-tokens {config.max_batch_tokens}, scored throughout"
        + (f"; an image of --max-image-pixels {config.max_image_pixels}" if vision else "")
        + f") does not fit on {runner.device} beside the model: lower them, or set "
        f"--kv-cache-memory ({failed.splitlines()[0] if failed else 'out of memory'})"
    )


def model_bytes(model: torch.nn.Module) -> int:
    """The memory the model's weights and buffers take (tied weights once)."""
    storages: dict[int, int] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        try:
            storage = tensor.untyped_storage()
        except NotImplementedError:  # oneDNN's prepacked weights on a CPU have none
            storages[id(tensor)] = tensor.numel() * tensor.element_size()
            continue
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@torch.inference_mode()
def profile_step(
    runner: ModelRunner, config: EngineConfig, *, uses_mrope: bool, max_context: int
) -> None:
    """Runs the step that takes the most memory once: ``--max-batch-tokens`` tokens
    of prefills with logits (and readout) at every row, each scored with the top
    ``--max-logprobs`` (prompts scored throughout), the first ``--max-running`` rows
    also tempered, filtered and drawn. (What attention adds for a chunk over cached
    context is the backend's ``chunk_bytes``.) Each prefill is at most ``max_context``
    tokens, as a session's: one longer fed positions a model of learned positions does
    not have (GPT-2's 1,024 under the default 2,048 tokens: an IndexError's traceback).
    They all write blocks from 0 on, whose contents nothing reads."""
    rows = config.max_batch_tokens
    batch = ForwardBatch()
    for first in range(0, rows, max_context):
        num_tokens = min(max_context, rows - first)
        rope = [(p, p, p) for p in range(num_tokens)] if uses_mrope else None
        blocks = list(range(-(-num_tokens // runner.block_size)))
        batch.add_sequence([0] * num_tokens, 0, blocks, runner.block_size, rope)
    batch.logits_rows = list(range(rows))
    if runner.readout is not None:
        batch.readout_rows = list(range(rows))
    logits = runner.execute(batch).logits  # [rows, V]
    token_ids = torch.zeros(rows, dtype=torch.long, device=runner.device)
    top_ks = [max(1, config.max_logprobs)] * rows
    scoring.score_on_device(scoring.log_softmax(logits), token_ids, top_ks)
    draws = min(config.max_running, rows)
    uploads = Uploads(runner.device)
    plan = filters.plan_filters([PROFILED_SAMPLING] * draws, runner.logits_width, uploads)
    uploads.send()
    filters.draw(filters.filter_logits(logits[:draws].float(), plan), [None] * draws)
