"""Tiny random models of the transformers architectures a user may serve, beyond the
Llama family of ``tiny_models``: two layers, 64 wide, the tests' byte tokenizer, and
``initializer_range`` 0.1 so that a wrong position or a stale cache entry moves the
logprobs visibly. Each is saved like any Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny_models import build_tokenizer

WINDOW = 8
"""The sliding window of the architectures that have one: the tests' sequences are
several times longer."""
HEAD_DIM = 16
LONGROPE_ORIGINAL = 64
"""The original context of the LongRoPE model: its long factors apply past it."""
MOE = dict(
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    n_routed_experts=4,
    n_shared_experts=1,
)
"""Expert counts under the names the MoE configs use (each takes the ones it knows)."""
MULTI_HEAD = dict(num_key_value_heads=None, head_dim=None)
"""For the configs that have no such fields (their heads are all query heads' width)."""


def _rope(rope_type: str, **parameters: Any) -> dict[str, Any]:
    return {"rope_type": rope_type, "rope_theta": 10000.0, **parameters}


ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3-rope": (
        "llama",
        dict(
            rope_parameters=_rope(
                "llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "llama-linear-rope": ("llama", dict(rope_parameters=_rope("linear", factor=2.0))),
    "llama-yarn-rope": (
        "llama",
        dict(rope_parameters=_rope("yarn", factor=4.0, original_max_position_embeddings=64)),
    ),
    "mixtral": ("mixtral", dict(sliding_window=WINDOW, **MOE)),
    "qwen2-moe": ("qwen2_moe", MOE),
    "qwen3-moe": ("qwen3_moe", MOE),
    "phimoe": ("phimoe", MOE),
    "gemma": ("gemma", {}),
    "gemma3-text": ("gemma3_text", dict(sliding_window=WINDOW)),
    "phi3-sliding": ("phi3", dict(sliding_window=WINDOW)),
    "olmo2": ("olmo2", {}),
    "granite": (
        "granite",
        dict(
            embedding_multiplier=3.0,
            attention_multiplier=0.3,
            residual_multiplier=0.5,
            logits_scaling=2.0,
        ),
    ),
    "starcoder2": ("starcoder2", dict(sliding_window=WINDOW)),
    "cohere2": ("cohere2", dict(sliding_window=WINDOW)),
    "smollm3": ("smollm3", {}),
    "glm4": ("glm4", {}),
    "internlm3": ("internlm3", {}),
    "afmoe": ("afmoe", dict(sliding_window=WINDOW, **MOE)),
    "stablelm": ("stablelm", {}),
    "nemotron": ("nemotron", {}),
    "phi": ("phi", MULTI_HEAD),
    "gpt2": ("gpt2", MULTI_HEAD),
    "gpt-neox": ("gpt_neox", MULTI_HEAD),
    "falcon": ("falcon", MULTI_HEAD),
    "opt": ("opt", MULTI_HEAD),
    "persimmon": ("persimmon", MULTI_HEAD),
    "gpt-bigcode": ("gpt_bigcode", dict(MULTI_HEAD, multi_query=True)),
    "gpt-j": ("gptj", dict(MULTI_HEAD, rotary_dim=8)),
    "codegen": ("codegen", dict(MULTI_HEAD, rotary_dim=8)),
    "phi3-longrope": (
        "phi3",
        dict(
            rope_parameters=_rope(
                "longrope",
                short_factor=[1.0 + i / 8 for i in range(HEAD_DIM // 2)],
                long_factor=[2.0 + i / 4 for i in range(HEAD_DIM // 2)],
                original_max_position_embeddings=LONGROPE_ORIGINAL,
            ),
            original_max_position_embeddings=LONGROPE_ORIGINAL,
        ),
    ),
}
"""Name -> (transformers model type, config values beyond the common ones)."""

REFUSED_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek-v3": (
        "deepseek_v3",
        dict(
            head_dim=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            kv_lora_rank=32,
            q_lora_rank=None,
            first_k_dense_replace=1,
            **MOE,
        ),
    ),
    "jetmoe": ("jetmoe", MOE),
    "diffllama": ("diffllama", {}),
    "gemma4-text": ("gemma4_text", dict(sliding_window=WINDOW)),
    "falcon-h1": ("falcon_h1", {}),
    "falcon-alibi": ("falcon", dict(MULTI_HEAD, alibi=True)),
    "mpt": ("mpt", MULTI_HEAD),
}
"""Architectures that load in transformers but that Salience cannot serve right."""


def build_architecture(directory: Path, name: str, seed: int = 0, **overrides: Any) -> Path:
    """Saves a random tiny model of ``ARCHITECTURES[name]`` or
    ``REFUSED_ARCHITECTURES[name]`` (with ``overrides``) and the tests' tokenizer to
    ``directory``."""
    model_type, options = (ARCHITECTURES | REFUSED_ARCHITECTURES)[name]
    tokenizer = build_tokenizer()
    values: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # A common value given as None is left to the config (which derives it or has none).
    dropped = {name for name, value in (options | overrides).items() if value is None}
    values = {
        name: value
        for name, value in (values | options | overrides).items()
        if not (name in dropped and name in values)
    }
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
