"""The shape of a model: its keys and values (read from its transformers config), its
decoder's parts, and which of its Linear layers compute torch's own product."""

from __future__ import annotations

from typing import Any, TypeGuard

import torch

LAYER_NAMES = ("layers", "h", "blocks")
"""What transformers' decoders call their list of layers (Llama's, GPT-2's, MPT's)."""
NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
"""...and their final norm (Llama's; Phi's; GPT-NeoX's; GPT-2's and Falcon's; Mamba's)."""


def decoder_parts(model: Any) -> tuple[Any, Any] | None:
    """(the decoder's layers, its final norm) of a transformers causal LM, or None where
    they are not found under the names transformers' decoders give them."""
    decoder = model.get_decoder()
    layers = next((getattr(decoder, n) for n in LAYER_NAMES if hasattr(decoder, n)), None)
    norm = next((getattr(decoder, n) for n in NORM_NAMES if hasattr(decoder, n)), None)
    return None if layers is None or norm is None else (layers, norm)


def kv_shape(model_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers model's text config."""
    model_config = model_config.get_text_config()
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return model_config.num_hidden_layers, num_kv_heads, head_dim


def is_plain_linear(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    """Whether ``module`` is a Linear layer whose product is torch's own: a subclass
    with a forward of its own (Phi-MoE's router returns its top experts) computes
    something else, so the CPU paths leave it as it is."""
    return isinstance(module, torch.nn.Linear) and (type(module).forward is torch.nn.Linear.forward)
