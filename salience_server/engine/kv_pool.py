"""How large the KV block pool is: its block size and its number of blocks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from salience_server.config import EngineConfig
from salience_server.engine import cpu_matmul, paged_attention
from salience_server.engine.loader import LoadedModel
from salience_server.engine.model_runner import kv_bytes_per_token, kv_dtype, kv_shape

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30
CUDA_KV_FRACTION = 0.6
"""Of the memory free after loading the model."""


@dataclass(frozen=True)
class PoolSize:
    block_size: int
    """Tokens per block."""
    num_blocks: int
    bytes_per_token: int
    """Keys and values of one token across all layers."""

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
    budget = _budget_bytes(loaded, config)
    num_blocks = max(1, budget // (bytes_per_token * block_size))
    size = PoolSize(block_size, num_blocks, bytes_per_token)
    if budget < size.block_bytes:
        log.warning(
            "the KV budget (%d bytes) is less than one block of %d tokens: the pool holds one",
            budget,
            block_size,
        )
    log.info(
        "KV pool: %d blocks of %d tokens (%.1f MiB)",
        num_blocks,
        block_size,
        num_blocks * size.block_bytes / 2**20,
    )
    return size


def _budget_bytes(loaded: LoadedModel, config: EngineConfig) -> int:
    if config.kv_cache_bytes:
        free = _free_bytes(loaded.device)
        # Attention gathers one layer's KV at a time into a workspace of that size.
        workspace = config.kv_cache_bytes // kv_shape(loaded.model.config)[0]
        if config.kv_cache_bytes + workspace > free:  # the allocation failed with a stack trace
            raise ValueError(
                f"--kv-cache-memory {config.kv_cache_bytes / 2**30:.1f}GiB, with the "
                f"{workspace / 2**30:.2f}GiB attention gathers one layer's KV into, is more "
                f"than the {free / 2**30:.1f}GiB free on {loaded.device} after loading the "
                "model; lower it"
            )
        return config.kv_cache_bytes
    if loaded.device.type == "cuda":
        return int(_free_bytes(loaded.device) * CUDA_KV_FRACTION)
    return CPU_DEFAULT_KV_BYTES


def _free_bytes(device: torch.device) -> int:
    """Memory free for the pool on ``device`` now."""
    if device.type != "cuda":
        return cpu_matmul.available_memory()
    # Blocks this process's caching allocator keeps from freed tensors (an engine
    # stopped before, the loading's temporaries) count as used in the driver's
    # figure: hand them back first, or each engine of a process gets less.
    torch.cuda.empty_cache()
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(free_bytes)
