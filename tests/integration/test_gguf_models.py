"""GGUF files other than the default model's: Llama and Qwen2, tied and untied, in
float and block-quantized types. Each converts once into the cache and serves exactly
what transformers computes from the same file (scores over a session built in chunks,
greedy decodes batched together), with the tokenizer, EOS and chat template the file
states. A damaged conversion says to remove it; a GGUF of an architecture transformers
cannot read is refused in one line, and one Salience cannot serve before converting."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from salience_server.config import ModelConfig
from salience_server.engine import conversion
from salience_server.engine.loader import UnsupportedModel, load_model
from tests.conftest import start_server
from tests.gguf_models import build_tiny_gguf
from tests.helpers import check_sessions_against_transformers, server_start_failure


@pytest.mark.parametrize(
    ("architecture", "quant", "tied"),
    [("llama", "Q8_0", False), ("qwen2", "Q4_0", True), ("llama", "BF16", True)],
)
def test_a_gguf_serves_what_transformers_computes_from_it(
    architecture: str, quant: str, tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = build_tiny_gguf(
        tmp_path / f"tiny-{quant}.gguf", architecture, quant, tie_word_embeddings=tied
    )
    source, name = str(tmp_path), gguf.name
    oracle = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    server = start_server(str(gguf), block_size=4, kv_cache_bytes=4 << 20)
    try:
        check_sessions_against_transformers(server.stub, oracle.eval(), [0, 5, 17, 40], 3, 8)
    finally:
        server.stop()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "_convert_into", refuse)
    loaded = load_model(ModelConfig(model=str(gguf), device="cpu"))
    assert (
        loaded.model_id == f"tiny-{quant}" and loaded.path.parent == tmp_path / "cache" / "models"
    )
    assert loaded.model.config.tie_word_embeddings is tied
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    text = "<|im_start|>user\nHé, 1+1?<|im_end|>\n"
    assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    assert loaded.eos_token_ids == [tokenizer.eos_token_id]


def test_a_gguf_is_known_by_its_magic_bytes_or_any_case_of_its_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF named by its digest (Ollama's blobs) or ``.GGUF`` was "neither a Hugging
    Face model directory nor a .gguf file". Both load, converted once between them."""
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = build_tiny_gguf(tmp_path / "tiny.gguf")
    blob = tmp_path / "sha256-0123abcd"
    upper = tmp_path / "Tiny.GGUF"
    shutil.copyfile(gguf, blob)
    shutil.copyfile(gguf, upper)
    first = load_model(ModelConfig(model=str(blob), device="cpu"))
    second = load_model(ModelConfig(model=str(upper), device="cpu"))
    assert (first.model_id, second.model_id) == ("sha256-0123abcd", "Tiny")
    assert first.path == second.path  # one conversion: the cache is keyed by content
    (tmp_path / "notes").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        load_model(ModelConfig(model=str(tmp_path / "notes"), device="cpu"))


def test_a_damaged_conversion_says_to_remove_it_and_is_then_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached conversion whose weights were cut short (a crash before the disk had
    them) failed every start asking whether the file was corrupt "or the architecture
    new", with nothing saying the directory is a cache that may be removed."""
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = build_tiny_gguf(tmp_path / "tiny.gguf")
    converted = load_model(ModelConfig(model=str(gguf), device="cpu")).path
    weights = converted / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"damaged: remove {converted} to convert again$"):
        load_model(ModelConfig(model=str(gguf), device="cpu"))
    shutil.rmtree(converted)
    assert load_model(ModelConfig(model=str(gguf), device="cpu")).path == converted
    assert weights.read_bytes() == whole


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_line(tmp_path: Path) -> None:
    """RWKV-6, which llama.cpp runs and transformers does not convert: the server exits 1
    naming the architecture, with no stack trace and no staging left in the cache."""

    def shape(writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(2)
        writer.add_embedding_length(64)

    gguf_path = _bare_gguf(tmp_path / "rwkv.gguf", "rwkv6", shape)
    cache = tmp_path / "cache"
    stderr = server_start_failure(
        "--model", str(gguf_path), "--port", "0", env={"SALIENCE_CACHE_DIR": str(cache)}
    )
    last = stderr.splitlines()[-1]
    assert "GGUF model with architecture rwkv6 is not supported" in last
    assert last.endswith("transformers does not read this architecture from GGUF"), last
    assert [path.name for path in (cache / "models").iterdir() if path.is_dir()] == []


def test_a_gguf_salience_cannot_serve_is_refused_before_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemma 2 GGUF (attention logit softcapping) was converted first, minutes and
    float32 weights written to the cache, and refused only then; its metadata says so."""
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))

    def shape(writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(64)
        writer.add_embedding_length(64)
        writer.add_block_count(2)
        writer.add_feed_forward_length(128)
        writer.add_head_count(4)
        writer.add_head_count_kv(2)
        writer.add_key_length(16)
        writer.add_layer_norm_rms_eps(1e-6)

    gguf_path = _bare_gguf(tmp_path / "gemma-2.gguf", "gemma2", shape)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted")

    monkeypatch.setattr(conversion, "_convert_into", refuse)
    with pytest.raises(UnsupportedModel, match=r"^gemma-2 uses attention logit softcapping"):
        load_model(ModelConfig(model=str(gguf_path), device="cpu"))


def _bare_gguf(path: Path, architecture: str, shape: Callable[[gguf.GGUFWriter], None]) -> Path:
    """A GGUF of ``architecture`` with the metadata ``shape`` writes, a two-token
    vocabulary and an embedding only: enough for its config to be read."""
    writer = gguf.GGUFWriter(str(path), architecture)
    shape(writer)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
