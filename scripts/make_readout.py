#!/usr/bin/env python3
"""Builds a readout file (SPEC 2.3) from contrastive prompt pairs.

For each concept, the vector at layer ``i`` is the mean hidden state (the residual
stream leaving decoder layer ``i``, at each prompt's last token) over the positive
prompts minus the mean over the negative ones.

    .venv/bin/python scripts/make_readout.py --pairs pairs.json --out readout.safetensors

``pairs.json`` maps each concept to a list of [positive, negative] prompt pairs:

    {"happy": [["I feel wonderful today", "I feel awful today"], ...], "formal": [...]}

Serve with ``salience-server --readout readout.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

from salience_server.engine.loader import resolve_model_path
from salience_server.engine.model_shape import decoder_parts


def last_token_states(model, tokenizer, text: str, layers: list[int]) -> torch.Tensor:
    """[n_layers, hidden] states leaving each chosen decoder layer at the last token."""
    captured: dict[int, torch.Tensor] = {}
    parts = decoder_parts(model)
    if parts is None:  # the server refuses such a model too
        sys.exit("make_readout: the model's decoder layers are not found by their usual names")
    decoder_layers = parts[0]  # ``layers``, GPT-2's and Falcon's ``h``, ...
    hooks = [
        decoder_layers[i].register_forward_hook(
            lambda module, inputs, output, i=i: captured.__setitem__(
                i, (output[0] if isinstance(output, tuple) else output)[0, -1]
            )
        )
        for i in layers
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([tokenizer.encode(text)]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([captured[i] for i in layers]).float()


def load_model(path: Path) -> torch.nn.Module:
    """The model as the server loads it: a vision model (Qwen2-VL) with its language model
    inside, else a causal LM; float32, for the vectors' precision."""
    is_vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    auto = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF directory or .gguf file (default: the default model)")
    parser.add_argument(
        "--pairs", required=True, help="JSON: concept -> [[positive, negative], ...]"
    )
    parser.add_argument("--layers", help="comma-separated layer indices (default: every layer)")
    parser.add_argument("--out", required=True, help="the readout .safetensors file to write")
    args = parser.parse_args()
    try:
        pairs = json.loads(Path(args.pairs).read_text())
        if not isinstance(pairs, dict) or not pairs:
            raise ValueError("the pairs file must map concept names to lists of pairs")
        for concept, items in pairs.items():
            if not concept:  # the server refuses a file with an unnamed concept
                raise ValueError("concept names must be non-empty")
            if (
                not isinstance(items, list)
                or not items
                or not all(isinstance(p, list) and len(p) == 2 for p in items)
            ):
                raise ValueError(f"concept {concept!r} needs a list of [positive, negative] pairs")
            if not all(isinstance(text, str) and text for pair in items for text in pair):
                raise ValueError(f"concept {concept!r}: each prompt must be non-empty text")
            if all(positive == negative for positive, negative in items):
                raise ValueError(f"concept {concept!r}: its pairs' prompts are all alike")
    except (OSError, ValueError) as error:
        sys.exit(f"make_readout: {error}")
    path, model_id = resolve_model_path(args.model)
    model = load_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    num_layers = model.config.get_text_config().num_hidden_layers
    try:
        chosen = [int(i) for i in args.layers.split(",")] if args.layers else range(num_layers)
    except ValueError:
        sys.exit(f"make_readout: --layers takes comma-separated integers, got {args.layers!r}")
    layers = sorted(set(chosen))
    if any(not 0 <= i < num_layers for i in layers):
        sys.exit(f"make_readout: layers must be in 0 .. {num_layers - 1}")
    vectors = []  # per concept: [n_layers, hidden]
    for concept, items in pairs.items():
        positive = torch.stack([last_token_states(model, tokenizer, p, layers) for p, _ in items])
        negative = torch.stack([last_token_states(model, tokenizer, n, layers) for _, n in items])
        vectors.append(positive.mean(0) - negative.mean(0))
        print(f"{concept}: {len(items)} pairs", file=sys.stderr)
    stacked = torch.stack(vectors, dim=1)  # [n_layers, n_concepts, hidden]
    tensors = {f"layers.{layer}": stacked[i].contiguous() for i, layer in enumerate(layers)}
    save_file(tensors, args.out, metadata={"concepts": json.dumps(list(pairs)), "model": model_id})
    print(
        f"wrote {args.out}: {len(pairs)} concepts at {len(layers)} layers of {model_id}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
