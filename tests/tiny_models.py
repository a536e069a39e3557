"""Tiny random models with real architectures, saved like any Hugging Face checkpoint.

``initializer_range`` is raised to 0.1 so the models are far from flat: a wrong
position or a stale cache entry moves the logprobs visibly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SLIDING_WINDOW = 8

SPECIAL_TOKENS = ["<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus the chat specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def text_config_options(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> dict:
    """A two-layer decoder with grouped-query attention, sized for fast tests."""
    options: dict = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return options | overrides


def build_tiny_model(directory: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """Saves a random tiny model and its tokenizer to ``directory``. ``architecture``:
    ``llama``, ``qwen3``, or with sliding-window attention over ``SLIDING_WINDOW``
    tokens, ``qwen2-sliding`` (layer 0 full, layer 1 sliding) and ``mistral-sliding``
    (every layer sliding)."""
    tokenizer = build_tokenizer()
    common = text_config_options(tokenizer, tie_word_embeddings=False)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen3": lambda: Qwen3Config(head_dim=16, **common),
        "qwen2-sliding": lambda: Qwen2Config(
            use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1, **common
        ),
        "mistral-sliding": lambda: MistralConfig(sliding_window=SLIDING_WINDOW, **common),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[architecture]())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def with_special_tokens_around_text(source: Path, directory: Path, template: str) -> Path:
    """A copy of the model at ``source`` whose tokenizer adds special tokens around a
    text, as ``template`` says (tokenizers' TemplateProcessing: "<s> $A", "<s> $A </s>";
    each must be a special token of the tokenizer)."""
    shutil.copytree(source, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    names = {name for name in template.split() if name != "$A"}
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[(name, tokenizer.convert_tokens_to_ids(name)) for name in names],
    )
    tokenizer.save_pretrained(directory)
    return directory


def reference_model(directory: Path) -> torch.nn.Module:
    """The same checkpoint loaded plainly by transformers: the oracle."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_tiny_vision_model(directory: Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Saves a random tiny Qwen2-VL (or Qwen2.5-VL) with its tokenizer and a real image
    processor configuration (small pixel limits keep the placeholder count low)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + VISION_TOKENS})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text = text_config_options(
        tokenizer,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    common = dict(
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, initializer_range=0.1)
        config = Qwen2VLConfig(vision_config=vision, **common)
    else:
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
            initializer_range=0.1,
        )
        config = Qwen2_5_VLConfig(vision_config=vision, **common)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(directory)
    return directory


def reference_vision_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
