"""Timing a model's Linear layers as a forward pass streams them, for the choice
``cpu_matmul`` makes at start-up from measurements."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from salience_server.engine.model_shape import is_plain_linear

MEASURED_BYTES = 512 << 20
"""The weights timed: the decoder's Linear layers in order up to this many bytes (all
of a small model), and the output head. Enough to stream from memory rather than cache
on most machines, as decoding does; little enough to take under a second."""
REPEATS = 3

Product = Callable[[torch.Tensor], torch.Tensor]


def timed_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The Linear layers to time (see ``MEASURED_BYTES``), in the forward's order."""
    layers: list[torch.nn.Linear] = []
    num_bytes = 0
    # A layer's own weight may be packed away (``cpu_matmul``): the embedding's dtype
    # is the one its weights are stored in.
    itemsize = model.get_input_embeddings().weight.dtype.itemsize  # type: ignore[operator]
    for module in model.get_decoder().modules():  # type: ignore[operator]
        if is_plain_linear(module) and num_bytes < MEASURED_BYTES:
            layers.append(module)
            num_bytes += module.in_features * module.out_features * itemsize
    head = model.get_output_embeddings()  # type: ignore[operator]
    if is_plain_linear(head):
        layers.append(head)
    return layers


@torch.inference_mode()
def pass_seconds(
    products: Sequence[tuple[Product, int]],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> float:
    """The best of ``REPEATS`` timed passes (after one untimed) through ``products``,
    each a (product, its input width), on random inputs of ``rows`` rows."""
    inputs = [torch.randn(rows, width, dtype=dtype, device=device) for _, width in products]
    best = float("inf")
    for attempt in range(REPEATS + 1):
        synchronize(device)
        start = time.perf_counter()
        for (product, _), x in zip(products, inputs, strict=True):
            product(x)
        synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
