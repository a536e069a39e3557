"""Tiny GGUF files written the way llama.cpp's converter writes them: a tiny random
Llama or Qwen2 (``tests.tiny_models``' byte tokenizer), its weights in one of the
quantization types transformers dequantizes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tests.tiny_models import CHAT_TEMPLATE, build_tokenizer, text_config_options

QUANT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
    "Q5_0": gguf.GGMLQuantizationType.Q5_0,
}
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for Llama's query and key rows (transformers undoes it)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def build_tiny_gguf(
    path: Path,
    architecture: str = "llama",
    quant: str = "F32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Writes a random tiny ``architecture`` model to ``path`` as a GGUF whose matrices
    are ``quant`` (norms and biases stay float32, as llama.cpp keeps them). K-quants
    take rows of 256 values, so their model is 256 wide."""
    tokenizer = build_tokenizer()
    wide = quant.endswith("_K")
    sizes = dict(hidden_size=256, intermediate_size=512) if wide else {}
    options = text_config_options(tokenizer, tie_word_embeddings=tie_word_embeddings, **sizes)
    config = LlamaConfig(**options) if architecture == "llama" else Qwen2Config(**options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases of no round values: F16 or BF16 would move them
        for name, vector in model.named_parameters():
            if vector.ndim == 1:
                vector.add_(torch.randn_like(vector) * 0.1 + (0.01 if "norm" in name else 0.0))
    arch = ARCHITECTURES[architecture]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-{architecture}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL
            for t in tokens
        ]
    )
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    qtype = QUANT_TYPES[quant]
    for hf_name, tensor in model.state_dict().items():
        if tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        data = tensor.detach().float().numpy()
        if architecture == "llama" and stem.endswith("q_proj"):
            data = _permute(data, config.num_attention_heads)
        elif architecture == "llama" and stem.endswith("k_proj"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
