"""Attention over the paged KV pool with flash-attn's varlen kernel (CUDA only).

One kernel call per layer covers the whole batch, prefill chunks and decodes alike:
``cu_seqlens_q`` and ``cu_seqlens_k`` say where each sequence's queries and context
lie, and flash-attn's causal mask is aligned to the bottom right, so query row i of a
sequence sees its context up to position ``context_len - query_len + i``: exactly the
session's rule, with cached context before the new tokens.

Two ways to hand it the context:

- **paged**: with a block size that is a multiple of 256 (the page size flash-attn 2's
  paged kernel takes), the kernel reads keys and values straight from the pool through
  each sequence's block table. Nothing is copied.
- **gathered**: with smaller blocks (the default 16), each layer first gathers the
  batch's contexts into one packed buffer, one ``index_select`` for keys and one for
  values, and the kernel runs over that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PAGE_MULTIPLE = 256
"""flash-attn 2's paged kernel takes pages of a multiple of this many tokens."""
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

VarlenKernel = Callable[..., torch.Tensor]
"""``flash_attn.flash_attn_varlen_func`` or anything with its signature and meaning."""


def load_kernel() -> VarlenKernel | None:
    """flash-attn's varlen function, or None when flash-attn is not installed (or was
    built against another torch, which shows up as an ImportError or OSError)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    return flash_attn_varlen_func  # type: ignore[no-any-return]


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn cannot serve this model here, or None when it can."""
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only, and the model is on {device.type}"
    if dtype not in _DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"flash-attn needs float16 or bfloat16, and the model is {name} (see --dtype)"
    if head_dim > _MAX_HEAD_DIM or head_dim % 8:
        return f"flash-attn takes head sizes up to {_MAX_HEAD_DIM} in steps of 8, not {head_dim}"
    if load_kernel() is None:
        return "flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    return None


def takes_block_table(kernel: VarlenKernel) -> bool:
    """flash-attn >= 2.6 reads a paged KV cache through ``block_table``."""
    try:
        return "block_table" in inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class FlashAttentionMetadata:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    slot_mapping: torch.Tensor
    """[T] long: where each new token's key and value go."""
    kernel: VarlenKernel
    cu_seqlens_q: torch.Tensor
    """[B + 1] int32: where each sequence's rows start in the batch."""
    cu_seqlens_k: torch.Tensor
    """[B + 1] int32: where each sequence's context starts, counted in tokens."""
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor | None
    """[B, max_blocks] int32, padded with block 0: the paged kernel's input."""
    context_slots: torch.Tensor | None
    """[sum of context lengths] long: the pool slots to gather, sequence after
    sequence, when the kernel cannot read the pool's pages itself."""

    def attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """query [1, H, T, D] over the pool -> [T, H, D]."""
        queries = query[0].transpose(0, 1).contiguous()  # [T, H, D]
        options: dict[str, Any] = {}
        if sliding_window is not None:  # keys p - w + 1 .. p
            options["window_size"] = (sliding_window - 1, 0)
        if self.block_table is not None:
            keys, values = key_cache, value_cache
            options["block_table"] = self.block_table
        else:
            assert self.context_slots is not None
            num_kv_heads, head_dim = key_cache.shape[-2:]
            keys = key_cache.view(-1, num_kv_heads, head_dim).index_select(0, self.context_slots)
            values = value_cache.view(-1, num_kv_heads, head_dim).index_select(
                0, self.context_slots
            )
        return self.kernel(
            queries,
            keys,
            values,
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.max_seqlen_q,
            self.max_seqlen_k,
            softmax_scale=scaling,
            causal=True,
            **options,
        )


class FlashAttentionBackend:
    """Builds each batch's varlen inputs; paged when the block size allows it."""

    def __init__(self, kernel: VarlenKernel, block_size: int, device: torch.device) -> None:
        self.kernel = kernel
        self.block_size = block_size
        self.device = device
        self.paged = block_size % PAGE_MULTIPLE == 0 and takes_block_table(kernel)

    @property
    def name(self) -> str:
        how = "paged" if self.paged else f"gathered from {self.block_size}-token blocks"
        return f"flash-attn varlen ({how})"

    def build_metadata(
        self,
        spans: Sequence[Any],
        slot_mapping: list[int],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> FlashAttentionMetadata:
        """Inputs for SequenceSpans that tile the batch's rows in order."""
        query_lens = torch.tensor([span.query_len for span in spans], dtype=torch.int32)
        context_lens = torch.tensor([span.context_len for span in spans], dtype=torch.int32)
        block_table = self._block_table(spans)  # [B, max_blocks], on the host
        table = None
        slots = None
        if self.paged:
            table = block_table.to(self.device, torch.int32, non_blocking=True)
        else:
            offsets = torch.arange(self.block_size)
            all_slots = (block_table[:, :, None] * self.block_size + offsets).flatten(1)
            inside = torch.arange(all_slots.shape[1])[None, :] < context_lens[:, None]
            slots = all_slots[inside].to(self.device, non_blocking=True)
        return FlashAttentionMetadata(
            kv_caches=kv_caches,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            kernel=self.kernel,
            cu_seqlens_q=_cumulative(query_lens).to(self.device, non_blocking=True),
            cu_seqlens_k=_cumulative(context_lens).to(self.device, non_blocking=True),
            max_seqlen_q=int(query_lens.max()),
            max_seqlen_k=int(context_lens.max()),
            block_table=table,
            context_slots=slots,
        )

    def _block_table(self, spans: Sequence[Any]) -> torch.Tensor:
        """[B, max_blocks] long: each span's blocks up to its context, padded with 0."""
        tables = [span.block_table[: -(-span.context_len // self.block_size)] for span in spans]
        width = max(len(table) for table in tables)
        return torch.tensor([table + [0] * (width - len(table)) for table in tables])


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B + 1] int32 offsets starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
