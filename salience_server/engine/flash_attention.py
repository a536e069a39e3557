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
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from salience_server.engine.model_shape import kv_shape
from salience_server.engine.uploads import Upload, Uploads

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
    version = _installed_version()
    if version is not None and version < _MIN_VERSION:
        # Before 2.1 its causal mask aligns to the top left (a decode row would see only
        # the first key: wrong, silently); 2.3 adds the sliding window.
        return f"flash-attn {'.'.join(map(str, version))} is older than 2.3; upgrade it"
    return None


_MIN_VERSION = (2, 3)


def _installed_version() -> tuple[int, ...] | None:
    """flash-attn's version as numbers (``2.7.4.post1`` is (2, 7, 4)); None if unknown."""
    import flash_attn

    numbers = []
    for part in str(getattr(flash_attn, "__version__", "")).split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers) or None


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
    slots: Upload
    """[T] long: where each new token's key and value go."""
    kernel: VarlenKernel
    query_starts: Upload
    """[B + 1]: where each sequence's rows start in the batch."""
    context_starts: Upload
    """[B + 1]: where each sequence's context starts, counted in tokens."""
    max_seqlen_q: int
    max_seqlen_k: int
    pages: Upload | None
    """[B * max_blocks], padded with block 0: the paged kernel's block table."""
    context_blocks: Upload | None
    """When the kernel cannot read the pool's pages itself: the blocks each sequence's
    context lies in, sequence after sequence (``context_slots`` is made of them)."""
    block_size: int = 0
    total_context_len: int = 0
    """The batch's context tokens, all sequences together."""

    @cached_property
    def context_slots(self) -> torch.Tensor:
        """[total_context_len] long: the pool slots to gather, sequence after sequence,
        worked out on the device once per step from the blocks (a host list of them
        took a Python int per context token)."""
        assert self.context_blocks is not None
        size, num_tokens = self.block_size, self.total_context_len
        starts = self.context_starts.tensor
        lengths = starts[1:] - starts[:-1]
        num_blocks = (lengths + size - 1) // size
        first_blocks = torch.cumsum(num_blocks, 0) - num_blocks
        sequences = torch.arange(lengths.numel(), device=starts.device)
        sequence = torch.repeat_interleave(sequences, lengths, output_size=num_tokens)
        position = torch.arange(num_tokens, device=starts.device) - starts[sequence]
        blocks = self.context_blocks.tensor[first_blocks[sequence] + position // size]
        return blocks * size + position % size

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.slots.tensor

    @cached_property
    def cu_seqlens_q(self) -> torch.Tensor:
        """[B + 1] int32, converted on the device once per step."""
        return self.query_starts.tensor.to(torch.int32)

    @cached_property
    def cu_seqlens_k(self) -> torch.Tensor:
        return self.context_starts.tensor.to(torch.int32)

    @cached_property
    def block_table(self) -> torch.Tensor | None:
        """[B, max_blocks] int32, or None when the context is gathered."""
        if self.pages is None:
            return None
        num_sequences = self.query_starts.length - 1
        return self.pages.tensor.to(torch.int32).view(num_sequences, -1)

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
            num_kv_heads, head_dim = key_cache.shape[-2:]
            slots = self.context_slots
            keys = key_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
            values = value_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
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

    has_workspace = False

    def chunk_bytes(self, rows: int, context: int, model_config: Any, dtype: torch.dtype) -> int:
        """Paged: none. Gathered: each layer's call copies the batch's context keys and
        values to one place first."""
        if self.paged:
            return 0
        _, num_kv_heads, head_dim = kv_shape(model_config)
        return 2 * context * num_kv_heads * head_dim * dtype.itemsize

    def resize_workspace(self, blocks: int) -> None:
        """Nothing to resize: flash-attn reads the pool in place, or gathers each
        batch's context into memory of that batch's size."""

    @property
    def name(self) -> str:
        how = "paged" if self.paged else f"gathered from {self.block_size}-token blocks"
        return f"flash-attn varlen ({how})"

    def build_metadata(
        self,
        spans: Sequence[Any],
        slot_mapping: list[int],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        uploads: Uploads,
    ) -> FlashAttentionMetadata:
        """Inputs for SequenceSpans that tile the batch's rows in order."""
        query_lens = [span.query_len for span in spans]
        context_lens = [span.context_len for span in spans]
        size = self.block_size
        tables = [span.block_table[: -(-span.context_len // size)] for span in spans]
        pages = context_blocks = None
        if self.paged:
            width = max(len(table) for table in tables)
            pages = uploads.add([b for table in tables for b in table + [0] * (width - len(table))])
        else:
            context_blocks = uploads.add([b for table in tables for b in table])
        return FlashAttentionMetadata(
            kv_caches=kv_caches,
            slots=uploads.add(slot_mapping),
            kernel=self.kernel,
            query_starts=uploads.add([0, *itertools.accumulate(query_lens)]),
            context_starts=uploads.add([0, *itertools.accumulate(context_lens)]),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(context_lens),
            pages=pages,
            context_blocks=context_blocks,
            block_size=size,
            total_context_len=sum(context_lens),
        )
