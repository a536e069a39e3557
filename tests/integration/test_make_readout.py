"""scripts/make_readout.py builds a file the server loads, holding mean differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from salience_server.engine.readout import load_readout
from tests.tiny_models import build_tokenizer, reference_model

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
    model, tokenizer = reference_model(tiny_llama_dir), build_tokenizer()
    with torch.no_grad():
        states = [
            model(torch.tensor([tokenizer.encode(t)]), output_hidden_states=True).hidden_states[1][
                0, -1
            ]
            for t in ("123", "one")
        ]
    assert torch.allclose(readout.vectors[0, 1], states[0] - states[1], atol=1e-5)
    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["concepts"]) == ["upper", "digits"]
