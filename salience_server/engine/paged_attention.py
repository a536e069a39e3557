"""Attention over the paged KV pool, hooked into transformers' attention registry.

transformers models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` in
every attention layer with the projected, rotated queries, keys and values, and pass
the model's extra keyword arguments down. We register ``salience_paged`` and pass an
``AttentionMetadata`` as ``salience_batch``: the function writes the new keys and
values into the pool through the slot mapping, then the metadata attends each
sequence over its own blocks. Llama, Qwen2 and Qwen3 models work unchanged. A decoder
layer that drops those keyword arguments (StableLM's) leaves its attention to find the
batch in the ``BatchSlot`` its module holds.

Two backends build that metadata: ``sdpa_attention.SdpaBackend`` (any device: torch SDPA per
prefill sequence, one padded call for all single-token decodes) and
``flash_attention.FlashAttentionBackend`` (CUDA with flash-attn installed: one varlen
kernel call per layer). ``select_backend`` picks one at start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AttentionInterface

from salience_server.config import ATTENTION_BACKENDS
from salience_server.engine import flash_attention
from salience_server.engine.sdpa_attention import SdpaBackend
from salience_server.engine.uploads import Uploads

log = logging.getLogger(__name__)

ATTENTION_NAME = "salience_paged"
_UNSUPPORTED_FEATURES = {"softcap": "attention logit softcapping", "s_aux": "attention sinks"}
"""Keyword arguments some models pass that change attention's result."""


class UnsupportedAttention(ValueError):
    """A model whose attention layers paged attention cannot serve right, found as the
    first forward pass runs."""


class AttentionMetadata(Protocol):
    """What one forward pass's attention layers need: built once per batch."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def slot_mapping(self) -> torch.Tensor:
        """[T] long: where each new token's key and value go."""
        ...

    def attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query [1, H, T, D] over one layer's pool (already holding the new tokens)
        -> [T, H, D]. With ``sliding_window`` w, the query at position p sees keys
        p - w + 1 .. p (transformers' sliding-window layers)."""
        ...


@dataclass
class BatchSlot:
    """The batch of the forward pass running now, held by every attention module of
    the model (``attach_slot``) for the decoder layers that do not pass transformers'
    keyword arguments on to their attention (StableLM's, Nemotron's)."""

    metadata: AttentionMetadata | None = None
    calls: list[int] | None = None
    """On the start-up pass only: each layer's attention calls, counted."""


def attach_slot(model: torch.nn.Module, slot: BatchSlot) -> None:
    """Gives ``slot`` to each of ``model``'s modules that has a layer index (its
    attention modules, which the attention function is handed)."""
    for module in model.modules():
        if hasattr(module, "layer_idx"):
            module.__dict__[_SLOT] = slot


_SLOT = "_salience_batch_slot"


class AttentionBackend(Protocol):
    @property
    def name(self) -> str: ...

    def resize_workspace(self, blocks: int) -> None:
        """Sizes what the backend gathers a layer's blocks into for a pool of ``blocks``
        blocks (0: the pool was released)."""
        ...

    @property
    def has_workspace(self) -> bool:
        """Whether it keeps a workspace of one layer's pool (1 / num_layers of it)."""
        ...

    def chunk_bytes(self, rows: int, context: int, model_config: Any, dtype: torch.dtype) -> int:
        """Memory a layer's attention holds beyond the pool and its workspace for a chunk
        of ``rows`` new tokens over ``context`` cached ones (not seen in a pass that
        starts from nothing cached)."""
        ...

    def build_metadata(
        self,
        spans: Sequence[Any],
        slot_mapping: list[int],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        uploads: Uploads,
    ) -> AttentionMetadata:
        """Adds its integer inputs to ``uploads``, which the runner sends (in one copy)
        before the forward pass reads them."""
        ...


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    salience_batch: AttentionMetadata | None = None,
    salience_calls: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> output [1, T, H, D].
    ``salience_calls``, on the start-up pass only: each layer's calls, counted here
    once its keys and values are found to fit the pool."""
    if salience_batch is None:  # a decoder layer dropped the keyword arguments
        slot = module.__dict__.get(_SLOT)
        if slot is None or slot.metadata is None:  # the start-up pass meets this first
            raise UnsupportedAttention(
                "the model's attention modules are not handed the batch (they have no "
                "layer index), which Salience's paged attention needs"
            )
        salience_batch, salience_calls = slot.metadata, slot.calls
    for name, feature in _UNSUPPORTED_FEATURES.items():
        if kwargs.get(name) is not None:
            raise UnsupportedAttention(
                f"the model uses {feature}, which paged attention does not implement"
            )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    key_cache, value_cache = salience_batch.kv_caches[layer]
    num_kv_heads, head_dim = key_cache.shape[-2:]
    if salience_calls is not None:
        _check_shapes(layer, key, value, (num_kv_heads, head_dim))
        salience_calls[layer] += 1
    # Write the new tokens' keys and values first: each sequence attends to itself too.
    # The pool may keep a wider dtype than the model's (``model_runner.kv_dtype``), and
    # index_copy_ costs two thirds of an indexed assignment, paid in every layer.
    slots = salience_batch.slot_mapping
    for cache, new_rows in ((key_cache, key), (value_cache, value)):
        rows = new_rows[0].transpose(0, 1)  # [T, Hkv, D]
        if rows.dtype != cache.dtype:
            rows = rows.to(cache.dtype)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, rows)
    sliding_window = kwargs.get("sliding_window")
    output = salience_batch.attend(query, key_cache, value_cache, scaling, sliding_window)
    # Contiguous, as transformers' own attention functions return it: some models view
    # the output (AFMoE), where a sequence attended alone comes back transposed. Most
    # reshape it, copying a transposed output anyway; a contiguous one then is a view.
    return output.unsqueeze(0).contiguous(), None


def _check_shapes(
    layer: int, key: torch.Tensor, value: torch.Tensor, pool: tuple[int, int]
) -> None:
    """Keys and values must have the pool's (heads, width): the pool is sized from the
    config, which does not describe every layout."""
    for name, tensor in (("keys", key), ("values", value)):
        shape = (int(tensor.shape[1]), int(tensor.shape[3]))
        if shape != pool:
            raise UnsupportedAttention(
                f"layer {layer} attends over {name} of {shape[0]} heads of {shape[1]}, "
                f"where the KV pool, sized from the config, holds {pool[0]} heads of "
                f"{pool[1]}: a layout Salience does not support (multi-head latent "
                "attention, as DeepSeek-V2/V3 use; keys repeated per expert, as JetMoE's)"
            )


DEFAULT_BLOCK_SIZE = 16


def default_block_size(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> int:
    """256 where the backend ``name`` resolves to flash-attn's paged kernel, which reads
    the pool in place but only in pages of 256 tokens; 16 elsewhere."""
    kernel = _flash_kernel(name, device, dtype, head_dim)
    if kernel is not None and flash_attention.takes_block_table(kernel):
        return flash_attention.PAGE_MULTIPLE
    return DEFAULT_BLOCK_SIZE


def select_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    workspace_blocks: int,
) -> AttentionBackend:
    """The backend ``--attention-backend`` names. ``auto`` takes flash-attn where it can
    run (CUDA, half precision, flash-attn installed) and SDPA otherwise; asking for
    flash-attn where it cannot run is an error that says why."""
    kernel = _flash_kernel(name, device, dtype, head_dim)
    backend: AttentionBackend
    if kernel is not None:
        flash = flash_attention.FlashAttentionBackend(kernel, block_size, device)
        if not flash.paged:
            log.info(
                "flash-attn reads the pool in place with --block-size %d (or a multiple, "
                "and flash-attn >= 2.6); with %d-token blocks each layer gathers the "
                "batch's context first",
                flash_attention.PAGE_MULTIPLE,
                block_size,
            )
        backend = flash
    else:
        backend = SdpaBackend(block_size, workspace_blocks, device)
    log.info("attention: %s", backend.name)
    return backend


def _flash_kernel(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> flash_attention.VarlenKernel | None:
    """flash-attn's kernel when the backend ``name`` resolves to it here, else None;
    a ValueError saying why when flash-attn was asked for by name and cannot run."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if name == "sdpa":
        return None
    reason = flash_attention.unsupported_reason(device, dtype, head_dim)
    if reason is None:
        return flash_attention.load_kernel()
    if name == "flash-attn":
        raise ValueError(f"--attention-backend flash-attn: {reason}")
    if device.type == "cuda":
        log.info("attention: SDPA, because %s", reason)
    return None


def register() -> None:
    """Paged attention builds its own per-sequence masks. With no mask function
    registered under its name, transformers makes none and returns before looking
    for packed sequences in the positions (a read of the device, a sync per pass)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
