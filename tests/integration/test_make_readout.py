"""scripts/make_readout.py builds a file the server loads, holding mean differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from salience_server.engine.readout import load_readout
from tests.tiny_models import (
    build_tiny_vision_model,
    build_tokenizer,
    reference_model,
    reference_vision_model,
)

ROOT = Path(__file__).resolve().parents[2]


def test_make_readout_writes_mean_differences(tmp_path, tiny_llama_dir) -> None:
    pairs = {"upper": [["ABC", "abc"], ["XYZ", "xyz"]], "digits": [["123", "one"]]}
    pairs_path = tmp_path / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    out = tmp_path / "readout.safetensors"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_readout.py"),
            "--model",
            str(tiny_llama_dir),
            "--pairs",
            str(pairs_path),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    readout = load_readout(out, num_layers=2, hidden_size=64)
    assert readout.concepts == ["upper", "digits"] and readout.layers == [0, 1]
    # The "digits" vector at layer 0, recomputed from output_hidden_states[1].
    states = _layer_0_states(reference_model(tiny_llama_dir), ("123", "one"))
    assert torch.allclose(readout.vectors[0, 1], states[0] - states[1], atol=1e-5)
    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["concepts"]) == ["upper", "digits"]


def _layer_0_states(model: Any, texts: tuple[str, ...]) -> list[torch.Tensor]:
    """The state leaving decoder layer 0 at each text's last token
    (``output_hidden_states[1]``)."""
    tokenizer = build_tokenizer()
    with torch.no_grad():
        return [
            model(torch.tensor([tokenizer.encode(t)]), output_hidden_states=True).hidden_states[1][
                0, -1
            ]
            for t in texts
        ]


def _make_readout(tmp_path: Path, model_dir: Path, pairs: object, *flags: str) -> Any:
    pairs_path = tmp_path / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    command = [sys.executable, str(ROOT / "scripts" / "make_readout.py"), "--model"]
    command += [str(model_dir), "--pairs", str(pairs_path), "--out", str(tmp_path / "r.st")]
    return subprocess.run([*command, *flags], capture_output=True, text=True, timeout=120)


def test_make_readout_refuses_pairs_it_cannot_use(tmp_path, tiny_llama_dir) -> None:
    """An empty prompt ended in a torch traceback; pairs all alike gave a zero vector."""
    for pairs, says in (
        ({"c": [["", "x"]]}, "non-empty text"),
        ({"c": [["same", "same"]]}, "all alike"),
        # A number in place of the list ended in a traceback; an empty name wrote a
        # file the server refuses to load.
        ({"c": 5}, "list of [positive, negative] pairs"),
        ({"": [["ABC", "abc"]]}, "concept names must be non-empty"),
    ):
        result = _make_readout(tmp_path, tiny_llama_dir, pairs)
        assert result.returncode == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_make_readout_takes_each_layer_once(tmp_path, tiny_llama_dir) -> None:
    """--layers 1,1,0 wrote one tensor a layer but said three layers."""
    result = _make_readout(tmp_path, tiny_llama_dir, {"c": [["A", "b"]]}, "--layers", "1,1,0")
    assert result.returncode == 0, result.stderr
    assert "at 2 layers" in result.stderr
    assert load_readout(tmp_path / "r.st", num_layers=2, hidden_size=64).layers == [0, 1]


def test_make_readout_takes_a_vision_model(tmp_path) -> None:
    """The server reads out Qwen2-VL's language model; the script refused the model
    (AutoModelForCausalLM does not take a Qwen2-VL configuration)."""
    model_dir = build_tiny_vision_model(tmp_path / "vl", "qwen2_vl")
    result = _make_readout(tmp_path, model_dir, {"c": [["ABC", "abc"]]}, "--layers", "0")
    assert result.returncode == 0, result.stderr
    readout = load_readout(tmp_path / "r.st", num_layers=2, hidden_size=64)
    states = _layer_0_states(reference_vision_model(model_dir), ("ABC", "abc"))
    assert torch.allclose(readout.vectors[0, 0], states[0] - states[1], atol=1e-5)


def test_make_readout_takes_a_model_whose_layers_are_named_h(tmp_path) -> None:
    """The server reads out GPT-2 (its layers are ``transformer.h``); the script looked
    for ``layers`` only and failed with a traceback."""
    from tests.architectures import build_architecture

    model_dir = build_architecture(tmp_path / "gpt2", "gpt2")
    result = _make_readout(tmp_path, model_dir, {"c": [["ABC", "abc"]]}, "--layers", "0")
    assert result.returncode == 0, result.stderr
    readout = load_readout(tmp_path / "r.st", num_layers=2, hidden_size=64)
    states = _layer_0_states(reference_model(model_dir), ("ABC", "abc"))
    assert torch.allclose(readout.vectors[0, 0], states[0] - states[1], atol=1e-5)
