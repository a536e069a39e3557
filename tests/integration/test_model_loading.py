"""A model that cannot be served is refused at start with one line naming why: a
checkpoint that lacks weights (it was served with random ones), a truncated or corrupt
file, an architecture not laid out as Llama's, a GGUF that is not a complete model (each
of the last three ended in a stack trace); so is a KV pool larger than the memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BioGptConfig

from salience_client.pb import salience_pb2 as pb
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine import cpu_matmul, decoder_layers
from salience_server.engine.engine import Engine
from salience_server.engine.errors import SalienceError
from salience_server.engine.loader import UnsupportedModel, load_model, resolve_model_path
from salience_server.engine.model_runner import kv_bytes_per_token
from salience_server.engine.request import DoneEvent, GenerateParams, SamplingParams
from tests.conftest import start_server
from tests.shim_support import start_shim
from tests.tiny_models import CHAT_TEMPLATE, build_tokenizer


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def _load(path: Path) -> None:
    load_model(ModelConfig(model=str(path), device="cpu"))


def test_a_checkpoint_that_lacks_a_weight_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_llama_dir, tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModel, match=r"lacks weights: model\.layers\.1\.mlp\.down_proj"):
        _load(model_dir)


def test_a_truncated_checkpoint_is_one_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_llama_dir, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot load model .* truncated or corrupt") as caught:
        _load(model_dir)
    assert "\n" not in str(caught.value)


def test_a_config_that_does_not_fit_the_weights_names_a_weight(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A config.json missing a field (its class's default then differs from the
    weights) failed with transformers' "look at the above report" as the reason."""
    model_dir = _copy(tiny_llama_dir, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    del config["num_key_value_heads"]  # 2; Llama's default: as many as query heads, 4
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModel,
        match=r"does not match its config\.json: model\.layers\.0\.self_attn\.k_proj\.weight "
        r"is \[32, 64\] there, where the config makes it \[64, 64\] \(and 3 more\)",
    ) as caught:
        _load(model_dir)
    assert "\n" not in str(caught.value)


def test_a_model_without_its_tokenizer_is_refused_before_loading_weights(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason named no tokenizer ("Couldn't instantiate the backend tokenizer from
    one of: "), and came after the weights had loaded (minutes for a large model)."""
    model_dir = _copy(tiny_llama_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded first")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(UnsupportedModel, match=r"model: cannot load its tokenizer from .*model \("):
        _load(model_dir)


def test_an_architecture_not_laid_out_as_llama_s_is_refused(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    config = BioGptConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="BioGptForCausalLM architecture is not supported"):
        _load(tmp_path)


def test_a_file_that_is_not_a_complete_gguf_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(92))
    with pytest.raises(ValueError, match="cannot convert .*cut.gguf .* complete GGUF") as caught:
        _load(gguf)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "cache" / "models").glob(".converting-*"))  # cleaned up


def test_a_layer_whose_attention_bypasses_the_kv_pool_is_refused(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose attention does not call transformers' attention interface would
    attend over each call's own tokens only: the first forward pass finds no KV written
    for that layer. Here transformers' own layers run (not the lean ones), and layer 1's
    attention is replaced by one that never reads or writes KV."""
    monkeypatch.setattr(decoder_layers, "streamline", lambda model: 0)
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    attention = loaded.model.model.layers[1].self_attn

    def bypassing(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple:
        return attention.o_proj(torch.zeros_like(hidden_states)), None

    monkeypatch.setattr(attention, "forward", bypassing)
    with pytest.raises(ValueError, match=r"layers \[1\] do not attend through"):
        Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))


def test_token_ids_past_the_output_layer_are_refused(tiny_llama_dir: Path) -> None:
    """A model whose output layer is narrower than its embedding: an id between the two
    passed the check (the embedding's rows) and failed as the step scored or biased it
    (on CUDA, a device assert that ends the engine). Valid ids are below both."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    rows, hidden = loaded.model.get_input_embeddings().weight.shape
    loaded.model.lm_head = torch.nn.Linear(hidden, rows - 10, bias=False)
    engine = Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert engine.vocab_size == rows - 10
    session = engine.open_session()
    for params in (
        GenerateParams(session_id=session.session_id, append_tokens=[1, rows - 5]),
        GenerateParams(
            session_id=session.session_id,
            append_tokens=[1],
            max_tokens=1,
            sampling=SamplingParams(logit_bias={rows - 5: 1.0}),
        ),
    ):
        with pytest.raises(SalienceError) as refused:
            engine.submit(params, lambda event: None)
        assert refused.value.reason == "INVALID_TOKEN"


def test_an_eos_id_past_the_logits_is_no_stop_token(tiny_llama_dir: Path) -> None:
    """A generation config's EOS id past the output layer can never be decoded; kept as
    a stop token, a call with ``min_tokens`` banned it by indexing past the logits (on
    CUDA, a device assert that ends the engine; here the call failed)."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    rows = int(loaded.model.get_input_embeddings().weight.shape[0])
    loaded.eos_token_ids = [2, rows + 3]
    engine = Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    assert engine.eos_token_ids == {2}
    session = engine.open_session()
    events: list[object] = []
    params = GenerateParams(
        session_id=session.session_id, append_tokens=[1, 5, 7], max_tokens=4, min_tokens=3
    )
    engine.submit(params, events.append)
    while not any(isinstance(event, (DoneEvent, SalienceError)) for event in events):
        engine.step()
    assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens >= 3


def test_a_kv_pool_larger_than_the_free_memory_is_refused(tiny_llama_dir: Path) -> None:
    """``--kv-cache-memory 1TiB`` ended in the allocator's stack trace."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(ValueError, match=r"--kv-cache-memory 1048576\.0GiB, with the"):
        Engine(loaded, EngineConfig(kv_cache_bytes=1 << 50))  # a PiB: more than any host


def test_the_free_memory_must_also_hold_the_attention_workspace(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention gathers one layer's KV into a workspace of that size: a pool that just
    fit the free memory left none for it, and failed as the first steps ran."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    pool = 8 << 20
    workspace = pool // loaded.model.config.num_hidden_layers
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: pool + workspace - 1)
    with pytest.raises(ValueError, match=r"attention gathers one layer's KV into"):
        Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=pool))
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: pool + workspace)
    engine = Engine(loaded, EngineConfig(block_size=4, kv_cache_bytes=pool))
    assert engine.block_manager.num_free * engine.block_size * engine.kv_bytes_per_token == pool


def test_a_block_larger_than_the_budget_must_fit_the_free_memory(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one block is more than the budget the pool holds one block anyway: its
    memory went unchecked, and --block-size 100000000 filled the host's memory."""
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    block_size = 1 << 17
    block = block_size * kv_bytes_per_token(loaded.model.config, torch.float32)  # 64 MiB
    workspace = block // loaded.model.config.num_hidden_layers
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: block + workspace - 1)
    with pytest.raises(ValueError, match=r"the least pool, 1 block\(s\) of --block-size 131072"):
        Engine(loaded, EngineConfig(block_size=block_size, kv_cache_bytes=1 << 20))
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: block + workspace)
    engine = Engine(loaded, EngineConfig(block_size=block_size, kv_cache_bytes=1 << 20))
    assert engine.block_manager.num_blocks == 1


def test_a_model_named_by_a_relative_path_is_served_under_its_directory_s_name(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model .`` from inside the model's directory served it as model "" (the shim
    listed id "" and answered 404 for the directory's name); ``..`` as "..". A symlink
    keeps its own name, not its target's."""
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / "sub").mkdir()
    (tmp_path / "current").symlink_to(model_dir)
    monkeypatch.chdir(model_dir)
    assert load_model(ModelConfig(model=".", device="cpu")).model_id == "model"
    assert resolve_model_path("./")[1] == "model"
    assert resolve_model_path("sub/..")[1] == "model"
    monkeypatch.chdir(model_dir / "sub")
    assert resolve_model_path("..")[1] == "model"
    assert resolve_model_path(str(tmp_path / "current"))[1] == "current"


def test_a_tokenizer_with_named_chat_templates_is_served(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer with a "default" and a "tool_use" template (Hermes 2 Pro's, Command
    R's) holds them as a dict: GetModelInfo failed on it (TypeError), so the shim
    answered every call 500. A call without tools renders through "default", one with
    tools through "tool_use", as transformers renders them."""
    model_dir = _copy(tiny_llama_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tool_use = "{{ tools | tojson }}" + CHAT_TEMPLATE
    tokenizer.chat_template = {"default": CHAT_TEMPLATE, "tool_use": tool_use}
    tokenizer.save_pretrained(model_dir)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi"}]
    want = [
        len(
            tokenizer.apply_chat_template(messages, tools=t, add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for t in (None, tools)
    ]
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=1 << 20)
    shim = start_shim(server.target)
    try:
        info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.model_id == "model" and info.chat_template == tool_use
        client = shim.client()
        got = [
            client.chat.completions.create(
                model="model", messages=messages, max_tokens=1, **options
            ).usage.prompt_tokens
            for options in ({}, {"tools": tools})
        ]
    finally:
        shim.stop()
        server.stop()
    assert got == want and want[0] < want[1]


@pytest.mark.parametrize("has_generation_config", [True, False])
def test_decoding_stops_at_every_eos_transformers_stops_at(
    has_generation_config: bool, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """EOS ids are the generation config's, or without a generation_config.json, those
    transformers derives from config.json: a config.json list (Llama 3's) was cut to
    the tokenizer's one id, so decoding ran past the others."""
    model_dir = _copy(tiny_llama_dir, tmp_path)
    generation_config = model_dir / "generation_config.json"
    if has_generation_config:
        generation_config.write_text(json.dumps({"eos_token_id": [65, 258]}))
    else:
        generation_config.unlink()
        config = json.loads((model_dir / "config.json").read_text())
        config["eos_token_id"] = [65, 258]
        (model_dir / "config.json").write_text(json.dumps(config))
    want = AutoModelForCausalLM.from_pretrained(model_dir).generation_config.eos_token_id
    assert want == [65, 258] != [AutoTokenizer.from_pretrained(model_dir).eos_token_id]
    assert load_model(ModelConfig(model=str(model_dir), device="cpu")).eos_token_ids == want
