"""bfloat16 and float16 matrix products on CPUs, with and without 16-bit units.

Without AVX-512 BF16 or AMX, torch's 16-bit GEMM emulates the arithmetic and is several
times slower than float32 once a product has more than a few rows: on an AVX2 CPU a
[370, 576] x [576, 1536] bf16 product took 45 ms, against 8.7 ms for the same product
upcast to float32 (weight conversion included), and the default model's 370-token
prefill took 5.6 s against 1.2 s. A decode step of a few sequences still gains from
16-bit weights, which halve the bytes read. So Linear layers keep their 16-bit weights,
and a product of at least ``MIN_ROWS`` rows runs in float32.

With AVX-512 BF16 or AMX, oneDNN multiplies bfloat16 natively, but ``F.linear``
reorders the weight into oneDNN's blocked layout at every call: the default model's
210 decoder Linear layers took 21 ms per pass at 1 to 16 rows, against 14 ms with the
weights reordered once (``prepack_linears``; the products are bit-identical).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MIN_ROWS = 12
"""From this many rows, the float32 product (with the weight's conversion) is faster.
Measured on AVX2, with 350 MB of weights streamed as a forward pass streams them
(ms for all, bf16 against upcast): 1 row 45 / 76, 8 rows 206 / 285, 16 rows 450 / 321,
64 rows 1832 / 550."""


def has_16_bit_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def emulates_16_bit(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` arithmetic on ``device`` is emulated: a 16-bit dtype on a CPU
    without 16-bit units. Wide products and attention then compute in float32."""
    return (
        device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not has_16_bit_units()
    )


def prepacks_16_bit(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Linear weights in ``dtype`` on ``device`` are kept in oneDNN's layout:
    bfloat16 on a CPU with 16-bit units."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and has_16_bit_units()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def prepack_linears(model: torch.nn.Module) -> int:
    """Replaces each bfloat16 Linear weight of ``model`` by the same weight in oneDNN's
    blocked layout (an opaque tensor of the same shape and dtype), which its forward
    then multiplies by; returns how many layers were changed. A weight tied to another
    module (an output head sharing the embedding) is copied, not moved: the other
    module keeps the plain one."""
    count = 0
    for module in model.modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module.weight.dtype == torch.bfloat16
            and not module.weight.is_mkldnn
        ):
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
            module.forward = _packed_forward(module)  # type: ignore[method-assign]
            count += 1
    return count


def _packed_forward(linear: torch.nn.Linear) -> Any:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            inputs, linear.weight, linear.bias, "none", [], ""
        )

    return forward


def upcast_wide_products(model: torch.nn.Module) -> int:
    """Makes every Linear of ``model`` multiply in float32 from ``MIN_ROWS`` rows on;
    returns how many layers were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype in (
            torch.bfloat16,
            torch.float16,
        ):
            module.forward = _forward(module)  # type: ignore[method-assign]
            count += 1
    return count


def _forward(linear: torch.nn.Linear) -> Any:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if inputs.numel() // inputs.shape[-1] < MIN_ROWS:
            return F.linear(inputs, linear.weight, linear.bias)
        bias = linear.bias.float() if linear.bias is not None else None
        return F.linear(inputs.float(), linear.weight.float(), bias).to(inputs.dtype)

    return forward
