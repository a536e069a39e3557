"""FBGEMM's float16-weight GEMM for 16-bit Linear layers on x86 CPUs (``cpu_matmul``
chooses where it runs).

Where a CPU has no 16-bit units, torch's 16-bit GEMM emulates the arithmetic, and its
cost grows with every row: on an AVX2 CPU the default model's bfloat16 decoder Linear
layers took 20 ms at one row, 100 ms at five and 270 ms at sixteen. FBGEMM's kernel
(what torch's dynamic float16 quantization runs) keeps float16 weights and converts
them to float32 inside the kernel (F16C): half the bytes of float32 at float32's
arithmetic, 18, 28 and 61 ms for the same rows, and 630 ms for a 370-row prefill
against 710 ms in float32 through MKL. A bfloat16 weight whose values all fit float16
exactly (those of the default model do) converts without changing a bit: the product
is the float32 product of the same bfloat16 values, rounded once to the input's dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from salience_server.engine.model_shape import is_plain_linear

_16_BIT = (torch.bfloat16, torch.float16)


def is_x86_avx2() -> bool:
    """An x86 CPU with AVX2 or newer: where FBGEMM's kernels (and oneDNN's prepacked
    float32 ones) were measured."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_fp16_gemm() -> bool:
    """Whether torch has FBGEMM's float16-weight GEMM here (x86 with AVX2 or newer)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and is_x86_avx2()


def fits(weight: torch.Tensor | None) -> bool:
    """A 16-bit weight whose every value float16 represents exactly."""
    if weight is None or weight.dtype not in _16_BIT:
        return False
    return weight.dtype == torch.float16 or torch.equal(
        weight.detach().to(torch.float16).to(weight.dtype), weight.detach()
    )


def product(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """FBGEMM's product on a float16 copy of ``weight`` (which ``fits``): float32
    arithmetic, the result in the input's dtype."""
    wide_bias = bias.detach().float() if bias is not None else None
    packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), wide_bias)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(inputs.float(), packed).to(inputs.dtype)

    return forward


def pack_linears(model: torch.nn.Module) -> int:
    """Gives each 16-bit Linear of ``model`` whose weight float16 holds exactly this
    kernel (its ``product``), in place of its weight, which is dropped (``weight``
    becomes None; a weight tied to another module, an output head sharing the
    embedding, stays with that module). Returns how many layers were changed; none
    where there is no such kernel."""
    if not has_fp16_gemm():
        return 0
    count = 0
    for module in model.modules():
        if is_plain_linear(module) and fits(module.weight):
            module.forward = product(module.weight, module.bias)  # type: ignore[method-assign]
            module.weight = None  # type: ignore[assignment]
            count += 1
    return count
