"""The shape of a model's keys and values, read from its transformers config."""

from __future__ import annotations

from typing import Any


def kv_shape(model_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers model's text config."""
    model_config = model_config.get_text_config()
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return model_config.num_hidden_layers, num_kv_heads, head_dim
