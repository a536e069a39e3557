"""The flash-attn backend against dense attention. flash-attn cannot run here (no CUDA),
so the backend runs over a plain-torch stand-in for ``flash_attn_varlen_func``
(``tests/flash_reference.py``): what these tests check is everything around the
kernel: packing, cu_seqlens, block tables, causal alignment of chunks over cached
context, and GQA."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from salience_server.engine.flash_attention import FlashAttentionBackend
from tests import flash_reference
from tests.attention_support import MIXED_BATCH
from tests.attention_support import attend_batch as _attend_batch


class _KernelSpy:
    """The reference kernel, remembering whether it was handed a block table."""

    def __init__(self) -> None:
        self.block_tables: list[Any] = []
        self.__signature__ = inspect.signature(flash_reference.flash_attn_varlen_func)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.block_tables.append(kwargs.get("block_table"))
        return flash_reference.flash_attn_varlen_func(*args, **kwargs)


@pytest.mark.parametrize("block_size", [4, 16])
def test_flash_backend_gathers_small_blocks_and_equals_dense_attention(block_size: int) -> None:
    spy = _KernelSpy()
    backend = FlashAttentionBackend(spy, block_size, torch.device("cpu"))
    assert not backend.paged
    got, want = _attend_batch(backend, block_size, MIXED_BATCH, seed=1)
    assert (got - want).abs().max().item() < 1e-5
    assert spy.block_tables == [None]  # one call for the whole batch, over packed context


def test_flash_backend_reads_256_token_pages_in_place_and_equals_dense_attention() -> None:
    spy = _KernelSpy()
    backend = FlashAttentionBackend(spy, 256, torch.device("cpu"))
    assert backend.paged
    shapes = [(0, 300), (250, 10), (511, 1), (0, 1), (700, 1), (255, 2)]
    got, want = _attend_batch(backend, 256, shapes, seed=2)
    assert (got - want).abs().max().item() < 1e-5
    [table] = spy.block_tables
    assert table.dtype == torch.int32 and table.shape == (len(shapes), 3)


def test_a_kernel_without_block_tables_gathers_even_with_256_token_blocks() -> None:
    def old_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):  # type: ignore[no-untyped-def]
        assert "block_table" not in kwargs
        return flash_reference.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs
        )

    backend = FlashAttentionBackend(old_kernel, 256, torch.device("cpu"))
    assert not backend.paged
    got, want = _attend_batch(backend, 256, [(0, 5), (300, 1)], seed=3)
    assert (got - want).abs().max().item() < 1e-5
