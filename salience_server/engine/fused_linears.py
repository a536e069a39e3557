"""Projections that read the same input, multiplied as one.

An attention layer multiplies its input by three weights (queries, keys, values) and an
MLP by two (gate, up). Stacked into one weight they take one product instead of three or
two, as vLLM's ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` do: one kernel
launch and one pass over the input for the lot, and on a CPU one operator call (each
costs ~15 us on this project's 2-core machine, whatever its size) and matrices wide
enough to stream well. On that CPU the default model's 150 q/k/v/gate/up products took
0.78-0.85x the time stacked (bfloat16 and float32, 1 to 8 rows), about 1.5-2.5 ms of a
decode step.

transformers' modules call each projection by name, so each keeps its name as a
``FusedPart``: the first to be called with an input computes the stacked product and
keeps the others' parts until they are called with that same tensor. A part called with
another input (never, in the architectures fused) computes the product again: never
wrong, only slower. The stacked weight is the only copy: the parts hold none, and
``model.modules()`` sees it once as a ``torch.nn.Linear`` (under the first part), so
the CPU paths (``cpu_matmul``) and the timings (``layer_timing``) treat it as one layer.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections of the same input, in the order transformers' Llama, Mistral,
Qwen2, Qwen3 and Qwen2-VL (text) modules call them."""


class _Stacked:
    """The stacked product of a group, and the parts of its last input not yet taken."""

    def __init__(self, linear: torch.nn.Linear, sizes: list[int]) -> None:
        self.linear = linear
        self.sizes = sizes
        self.input: torch.Tensor | None = None
        self.parts: list[torch.Tensor | None] = []

    def part(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        if self.input is not inputs or self.parts[index] is None:
            self.parts = list(self.linear(inputs).split(self.sizes, dim=-1))
            self.input = inputs
        part = self.parts[index]
        assert part is not None
        self.parts[index] = None
        if all(p is None for p in self.parts):
            self.input = None  # every part taken: hold nothing until the next input
        return part


class FusedPart(torch.nn.Module):
    """One projection of a stacked group (see the module's docstring); the first part
    holds the stacked Linear as its child ``stacked_linear``."""

    def __init__(self, stacked: _Stacked, index: int) -> None:
        super().__init__()
        if index == 0:
            self.stacked_linear = stacked.linear
        self._stacked = stacked
        self._index = index
        self.out_features = stacked.sizes[index]
        self.in_features = stacked.linear.in_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._stacked.part(self._index, inputs)


def stacked_group(
    module: torch.nn.Module, names: tuple[str, ...]
) -> tuple[torch.nn.Linear, list[int]] | None:
    """Where ``module``'s projections ``names`` are the parts of one stacked group, in
    that order: its stacked Linear and the parts' widths, with which a caller may make
    the group's product itself (``decoder_layers``); else None."""
    parts = [getattr(module, name, None) for name in names]
    if not all(isinstance(part, FusedPart) for part in parts):
        return None
    stacked = parts[0]._stacked  # type: ignore[union-attr]
    same = all(
        part._stacked is stacked and part._index == index  # type: ignore[union-attr]
        for index, part in enumerate(parts)
    )
    return (stacked.linear, stacked.sizes) if same and len(stacked.sizes) == len(names) else None


def fuse_projections(model: torch.nn.Module) -> int:
    """Stacks each group of ``GROUPS`` found under one module of ``model``, where its
    members are plain Linear layers of one input width, dtype and device, not shared
    with another module; returns how many groups were stacked."""
    shared = _shared_parameters(model)
    count = 0
    # The parents only: a list of every module would keep each replaced Linear alive
    # until the end, so the stacked copies would briefly take half the model's weight
    # memory again (gigabytes on a GPU, where a large model could then not start).
    parents = [m for m in model.modules() if any(hasattr(m, names[0]) for names in GROUPS)]
    for module in parents:
        for names in GROUPS:
            found = [getattr(module, name, None) for name in names]
            layers = [layer for layer in found if type(layer) is torch.nn.Linear]
            if len(layers) < len(names) or not _stackable(layers, shared):
                continue
            stacked = _Stacked(_stack(layers), [layer.out_features for layer in layers])
            for index, name in enumerate(names):
                setattr(module, name, FusedPart(stacked, index))
            count += 1
    if count:
        log.info("%d groups of projections of the same input multiply as one", count)
    return count


def _stackable(layers: list[torch.nn.Linear], shared: set[int]) -> bool:
    first = layers[0].weight
    return all(
        layer.in_features == layers[0].in_features
        and layer.weight.dtype == first.dtype
        and layer.weight.device == first.device
        and not layer.weight.is_mkldnn
        and layer.weight.data_ptr() not in shared
        for layer in layers
    )


def _stack(layers: list[torch.nn.Linear]) -> torch.nn.Linear:
    weight = torch.cat([layer.weight.detach() for layer in layers])
    has_bias = any(layer.bias is not None for layer in layers)
    stacked = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    stacked.weight = torch.nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [
            layer.bias.detach()
            if layer.bias is not None
            else torch.zeros(layer.out_features, dtype=weight.dtype, device=weight.device)
            for layer in layers
        ]
        stacked.bias = torch.nn.Parameter(torch.cat(biases), requires_grad=False)
    return stacked


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """Storage of parameters that more than one module holds (tied weights). Weights
    already in oneDNN's layout (a model prepared before) have no storage to compare."""
    seen: set[int] = set()
    shared: set[int] = set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if parameter.is_mkldnn:
                continue
            pointer = parameter.data_ptr()
            (shared if pointer in seen else seen).add(pointer)
    return shared
