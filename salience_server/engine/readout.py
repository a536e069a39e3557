"""Readout: hidden states of chosen layers projected onto named concept vectors (SPEC 2.3).

The file is safetensors: one ``[n_concepts, hidden_size]`` tensor per chosen layer,
named ``layers.<index>``, and the concept names as a JSON list under the metadata key
``concepts``. Layer ``i`` is the residual stream leaving decoder layer ``i``, before
any final norm.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

_LAYER_NAME = re.compile(r"layers\.([0-9]+)")


@dataclass(frozen=True)
class Readout:
    layers: list[int]
    """Decoder layer indices, ascending."""
    concepts: list[str]
    vectors: torch.Tensor
    """[n_layers, n_concepts, hidden_size] concept vectors, in ``layers`` order."""

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n_layers, R, hidden_size] states -> [R, n_layers, n_concepts] float32 dots."""
        vectors = self.vectors.to(device=hidden.device, dtype=torch.float32)
        return torch.einsum("lrh,lch->rlc", hidden.float(), vectors)


def load_readout(path: str | Path, num_layers: int, hidden_size: int) -> Readout:
    """Loads and checks a readout file; ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"readout file {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:
        raise ValueError(f"readout file {path} is not a safetensors file: {error}") from error
    with handle:
        concepts = _concept_names(handle.metadata() or {}, path)
        by_layer: dict[int, torch.Tensor] = {}
        for name in handle.keys():
            match = _LAYER_NAME.fullmatch(name)
            if match is None:
                raise ValueError(
                    f"readout file {path}: tensor {name!r} is not named layers.<index>"
                )
            layer = int(match.group(1))
            if layer >= num_layers:
                raise ValueError(
                    f"readout file {path}: layer {layer} is past the model's {num_layers} layers"
                )
            if layer in by_layer:
                raise ValueError(f"readout file {path}: layer {layer} has two tensors")
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != (len(concepts), hidden_size):
                raise ValueError(
                    f"readout file {path}: {name} has shape {tuple(tensor.shape)}, expected "
                    f"[{len(concepts)} concepts, hidden size {hidden_size}]"
                )
            if not torch.isfinite(tensor.float()).all():
                raise ValueError(f"readout file {path}: {name} is not all finite numbers")
            by_layer[layer] = tensor
    if not by_layer:
        raise ValueError(f"readout file {path} holds no layers.<index> tensors")
    layers = sorted(by_layer)
    vectors = torch.stack([by_layer[layer].float() for layer in layers])
    return Readout(layers=layers, concepts=concepts, vectors=vectors)


def _concept_names(metadata: dict[str, str], path: Path) -> list[str]:
    if "concepts" not in metadata:
        raise ValueError(f"readout file {path}: the metadata has no 'concepts' list of names")
    try:
        concepts = json.loads(metadata["concepts"])
    except json.JSONDecodeError as error:
        raise ValueError(f"readout file {path}: 'concepts' is not JSON: {error}") from error
    if not isinstance(concepts, list) or not all(isinstance(c, str) and c for c in concepts):
        raise ValueError(f"readout file {path}: 'concepts' must be a JSON list of names")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"readout file {path}: concept names are not unique")
    if not concepts:
        raise ValueError(f"readout file {path}: 'concepts' is empty")
    return concepts
