"""Runs the model over a flattened batch with paged KV storage. Holds no policy."""

from __future__ import annotations

from typing import Any

import torch

from salience_server.engine import paged_attention
from salience_server.engine.batch import ForwardBatch


def kv_shape(model_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers text config."""
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return model_config.num_hidden_layers, num_kv_heads, head_dim


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token needs across all layers."""
    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


class ModelRunner:
    """Owns the model and the KV pool tensors; executes ForwardBatches."""

    def __init__(self, model: Any, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        num_layers, num_kv_heads, head_dim = kv_shape(model.config)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # One (keys, values) pair per layer: [num_blocks, block_size, Hkv, D] each.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs one forward pass; returns [K, V] logits for ``batch.logits_rows``."""
        device = self.device
        metadata = paged_attention.PagedAttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(batch.slot_mapping, dtype=torch.long, device=device),
            sequences=[
                paged_attention.SequenceAttention(
                    query_start=span.query_start,
                    query_len=span.query_len,
                    context_len=span.context_len,
                    block_ids=torch.tensor(
                        span.block_table[: -(-span.context_len // self.block_size)],
                        dtype=torch.long,
                        device=device,
                    ),
                    mask=paged_attention.causal_mask(span.query_len, span.context_len, device),
                )
                for span in batch.sequences
            ],
        )
        input_ids = torch.tensor([batch.token_ids], dtype=torch.long, device=device)  # [1, T]
        positions = torch.tensor([batch.positions], dtype=torch.long, device=device)  # [1, T]
        logits_rows = torch.tensor(batch.logits_rows, dtype=torch.long, device=device)  # [K]
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=logits_rows,
            salience_batch=metadata,
        )
        return output.logits[0]  # [K, V]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies whole blocks (copy-on-write before a shared block is written)."""
        if not copies:
            return
        sources = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.device)
        targets = torch.tensor([t for _, t in copies], dtype=torch.long, device=self.device)
        for keys, values in self.kv_caches:
            keys[targets] = keys[sources]
            values[targets] = values[sources]
