"""How a model's Linear layers multiply on a CPU: three paths, chosen by dtype and CPU.

**oneDNN, weights prepacked** (float32 on x86 with AVX2 or newer; bfloat16 with
AVX-512 BF16 or AMX): ``F.linear`` goes to MKL, or reorders the weight into oneDNN's
blocked layout at every call. ``prepack_linears`` reorders each weight once. On an AVX2
CPU (AMD EPYC) the default model's decoder Linear layers took 48 ms at one row in
float32 through MKL and 32 ms prepacked, 85 and 47 ms at eight rows; its output head
14 and 8 ms at one row, 36 and 12 ms at eight (and MKL took 1.3x longer for 2 or 3 rows
than for 4). With AMX in bfloat16: 21 and 14 ms for the decoder at 1 to 16 rows. The
float32 sums run in another order than MKL's, so products differ from ``F.linear`` in
the last bits (about 1e-6 of their size); with AMX the bfloat16 products were
bit-identical. MKL's float32 kernels for one or two rows are faster on an Intel Xeon
(with AMX): 27-31 ms at one row against 36-43 prepacked, 30 against 44-52 at two,
while prepacked ones win from four rows (44 against 41 ms; 58-64 against 44-46 at
eight). In bfloat16 on an AMD EPYC with AVX-512 BF16 but no AMX, oneDNN's kernels took
23-24 ms at one row, 21-22 at four and 19-24 at eight, where FBGEMM's float16-weight
GEMM (below) took 12-16, 14-17 and 19-25 ms on the same values. Where the model's own
layers measure so as it starts (``narrow_products_below``), they keep a second copy for
the products narrower than that (``narrow_product``): the plain float32 weights for
MKL, float16 ones for FBGEMM. It doubles the memory of those weights (kept only where
that fits in a quarter of the memory available), for a float32 decode step 0.8x as long
on the Xeon. On the AVX2 EPYC, and for bfloat16 with AMX, the prepacked weights won at
every row count, and no copy is kept.

**FBGEMM's float16-weight GEMM** (16-bit models without 16-bit units; narrow bfloat16
products beside oneDNN's, above, where it is faster): float16 weights converted to
float32 inside the kernel, for a bfloat16 weight whose values float16 holds exactly
(``fp16_gemm``, with its measurements).

**Upcast from ``MIN_ROWS`` rows** (16-bit layers FBGEMM cannot take: a value outside
float16's range or precision, a CPU without FBGEMM): ``upcast_wide_products`` keeps the
16-bit weight and multiplies products of many rows in float32: a [370, 576] x [576, 1536]
bf16 product took 45 ms emulated, against 8.7 ms upcast.

Where 16-bit arithmetic is emulated, the activations between layers are float32 as well
(``compute_in_float32``): the weights keep their 16-bit values and bytes, but nothing
rounds a layer's output to 16 bits, and no operator converts its inputs back and forth.
transformers' bfloat16 forward converts around every Linear layer, norm and attention
call (about 800 conversions per decode step of the default model, 3-4 ms of a 45 ms
step on the AVX2 CPU); in float32 the step took 36 ms against 39 ms (8 rows: 69 against
75 ms). Results are then those of float32 arithmetic on the bfloat16 weights: closer to
the float32 model's than transformers' bfloat16 forward is.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from salience_server.engine import fp16_gemm, kernel_caches, layer_timing
from salience_server.engine.model_shape import is_plain_linear

log = logging.getLogger(__name__)

_16_BIT = (torch.bfloat16, torch.float16)

MIN_ROWS = 12
"""From this many rows, the float32 product (with the weight's conversion) is faster.
Measured on AVX2, with 350 MB of weights streamed as a forward pass streams them
(ms for all, bf16 against upcast): 1 row 45 / 76, 8 rows 206 / 285, 16 rows 450 / 321,
64 rows 1832 / 550."""


def prepare_linears(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Sets up ``model``'s Linear layers for the path this CPU and ``dtype`` take (see
    the module's docstring); on other devices, nothing."""
    if prepacks(device, dtype):
        kernel_caches.bound()
        timed: Prepared = {}
        below = narrow_products_below(model, dtype, device, timed)
        kept = narrow_bytes(model, dtype) if below else 0
        count = prepack_linears(model, dtype, below, timed)
        log.info("%d Linear layers keep their weights in oneDNN's layout", count)
        if below:
            log.info(
                "...and %s for products of fewer than %d rows (%.0f MB more)",
                NARROW_KERNELS[dtype],
                below,
                kept / 2**20,
            )
    elif emulates_16_bit(device, dtype):
        packed = fp16_gemm.pack_linears(model)
        if packed:
            log.info("%d Linear layers multiply float16-held weights in float32", packed)
        upcast = upcast_wide_products(model)
        if upcast:
            log.info("%d Linear layers multiply in float32 from %d rows on", upcast, MIN_ROWS)
        compute_in_float32(model)
        log.info("activations are float32 between layers (16-bit arithmetic is emulated here)")


def has_16_bit_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def has_float16_units() -> bool:
    """Whether this CPU multiplies float16 natively too (AVX-512 FP16 or AMX-FP16, as
    oneDNN sees it). A CPU with bf16 units only (an EPYC with AVX-512 BF16) has none:
    there torch's float16 kernels took 2.4x as long as bf16's on a 2,840-token prompt."""
    return has_16_bit_units() and _mkldnn_float16()


def _mkldnn_float16() -> bool:
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    return bool(supported())


def emulates_16_bit(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` arithmetic on ``device`` is emulated: a 16-bit dtype on a CPU
    without units for it. Products and attention then compute in float32."""
    if device.type != "cpu" or dtype not in _16_BIT:
        return False
    return not (has_16_bit_units() if dtype == torch.bfloat16 else has_float16_units())


def prepacks(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Linear weights in ``dtype`` on ``device`` are kept in oneDNN's layout:
    float32 on x86 CPUs with AVX2 or newer (where it was measured), bfloat16 where the
    CPU also has 16-bit units."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return fp16_gemm.is_x86_avx2()
    return (
        dtype == torch.bfloat16
        and has_16_bit_units()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


NARROW_KERNELS = {
    torch.float32: "their plain weights (MKL)",
    torch.bfloat16: "float16 copies of their weights (FBGEMM)",
}
"""What a prepacked layer may keep beside its oneDNN weight for products of few rows
(``narrow_product``), by dtype, as the log names it."""
NARROW_ROWS_TIMED = (1, 2, 4)
"""Row counts at which ``narrow_products_below`` times the narrow kernel against the
prepacked one, in order, until the prepacked one is as fast."""
NARROW_MARGIN = 0.9
"""The narrow kernel is kept for a row count only where its pass takes at most this
share of the prepacked one's: its copy of the weights costs memory."""
MIN_TIMED_BYTES = 32 << 20
"""Smaller models are not timed (nor given narrow copies): their weights stay in cache,
their products take microseconds, and a measurement of them would be noise."""
NARROW_MEMORY_SHARE = 0.25
"""Narrow copies are kept only where they take at most this share of the memory
available as the model loads (the KV pool and the host tier come after them)."""


def narrow_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Any | None:
    """The product that may beat the prepacked one on few rows, on its own copy of
    ``weight``: for float32, ``F.linear`` (MKL) on the plain weight; for bfloat16,
    FBGEMM's float16-weight GEMM where float16 holds every value of the weight (the
    float32 product of the same values, rounded once to bfloat16, as oneDNN's is); None
    where there is none."""
    if weight.dtype == torch.float32:
        return _plain_product(weight, bias)
    if weight.dtype == torch.bfloat16 and fp16_gemm.has_fp16_gemm() and fp16_gemm.fits(weight):
        return fp16_gemm.product(weight, bias)
    return None


Prepared = dict[torch.nn.Linear, tuple[torch.Tensor, Any | None]]
"""Linear layers' weights in oneDNN's layout and their ``narrow_product`` (or None), as
``narrow_products_below`` made them for its timing, for ``prepack_linears`` to keep:
making them again took 1.2 s of a 5.5 s start for the default model in bfloat16."""


def narrow_products_below(
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    prepared: Prepared | None = None,
) -> int:
    """Below how many rows ``model``'s ``dtype`` Linear layers multiply faster by their
    ``narrow_product`` than prepacked, timed over the layers a forward pass streams
    (``layer_timing``) at ``NARROW_ROWS_TIMED`` rows; 0 where never. The products it
    times go into ``prepared``."""
    layers = [
        layer
        for layer in layer_timing.timed_layers(model)
        if layer.weight is not None and layer.weight.dtype == dtype and not layer.weight.is_mkldnn
    ]
    if sum(layer.weight.numel() * dtype.itemsize for layer in layers) < MIN_TIMED_BYTES:
        return 0
    needed, available = narrow_bytes(model, dtype), available_memory()
    if needed > NARROW_MEMORY_SHARE * available:
        log.info(
            "Linear layers: no narrow copies beside the prepacked weights (%.0f MB, with "
            "%.0f MB of memory available)",
            needed / 2**20,
            available / 2**20,
        )
        return 0
    prepared = {} if prepared is None else prepared
    for layer in layers:
        prepared[layer] = (_reorder(layer.weight), narrow_product(layer.weight, layer.bias))
    packed = [
        (_packed_product(prepared[layer][0], layer.bias), layer.in_features) for layer in layers
    ]
    narrow = [
        (prepared[layer][1] or product, width)
        for layer, (product, width) in zip(layers, packed, strict=True)
    ]
    seconds: dict[int, tuple[float, float]] = {}
    for rows in NARROW_ROWS_TIMED:
        times = (
            layer_timing.pass_seconds(narrow, rows, dtype, device),
            layer_timing.pass_seconds(packed, rows, dtype, device),
        )
        seconds[rows] = times
        log.info(
            "Linear layers at %d rows: %.1f ms a pass by %s, %.1f prepacked",
            rows,
            times[0] * 1e3,
            NARROW_KERNELS[dtype],
            times[1] * 1e3,
        )
        if times[0] > NARROW_MARGIN * times[1]:
            break
    return narrow_rows_below(seconds)


def narrow_rows_below(seconds: dict[int, tuple[float, float]]) -> int:
    """From (narrow, prepacked) seconds by row count: the rows below which narrow copies
    are kept, one more than the last of the row counts, taken in order, at which the
    narrow kernel was faster by ``NARROW_MARGIN``; 0 when it was not at the first."""
    below = 0
    for rows in sorted(seconds):
        narrow, packed = seconds[rows]
        if narrow > NARROW_MARGIN * packed:
            break
        below = rows + 1
    return below


def prepack_linears(
    model: torch.nn.Module,
    dtype: torch.dtype,
    narrow_below: int = 0,
    prepared: Prepared | None = None,
) -> int:
    """Replaces each ``dtype`` Linear weight of ``model`` by the same weight in oneDNN's
    blocked layout (an opaque tensor of the same shape and dtype), which its forward
    then multiplies by; products of fewer than ``narrow_below`` rows take the layer's
    ``narrow_product``, where it has one (``narrow_bytes`` more). Layers in ``prepared``
    take the ones made there. Returns how many layers were changed. A weight tied to
    another module (an output head sharing the embedding) is copied, not moved: the
    other module keeps the plain one."""
    prepared = {} if prepared is None else prepared
    count = 0
    for module in model.modules():
        if (
            is_plain_linear(module)
            and module.weight is not None
            and module.weight.dtype == dtype
            and not module.weight.is_mkldnn
        ):
            weight = module.weight.detach()
            timed = prepared.pop(module, None)
            reordered, narrow = timed or (_reorder(weight), None)
            if narrow_below <= 1:
                narrow = None
            elif timed is None:
                narrow = narrow_product(weight, module.bias)
            module.weight = torch.nn.Parameter(reordered, requires_grad=False)
            packed = _packed_product(module.weight, module.bias)
            module.forward = _packed_forward(packed, narrow, narrow_below)  # type: ignore[method-assign]
            count += 1
    return count


def narrow_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """What the narrow copies of ``model``'s ``dtype`` Linear weights cost beside the
    prepacked ones, at most: in float32 the plain weights, but for those another module
    holds (a tied output head's is the embedding's); in bfloat16 a float16 copy of each."""
    shared = {
        parameter.data_ptr()
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for parameter in module.parameters(recurse=False)
    }
    return sum(
        module.weight.numel() * module.weight.element_size()
        for module in model.modules()
        if is_plain_linear(module)
        and module.weight is not None
        and module.weight.dtype == dtype
        and not module.weight.is_mkldnn
        and (dtype != torch.float32 or module.weight.data_ptr() not in shared)
    )


def available_memory() -> int:
    """Bytes of host memory available now (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _rows(inputs: torch.Tensor) -> int:
    """How many rows a product of ``inputs`` multiplies (all dimensions but the last)."""
    return inputs.numel() // inputs.shape[-1]


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _plain_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    weight = weight.detach()

    def product(inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, weight, bias)

    return product


def _packed_product(packed: torch.Tensor, bias: torch.Tensor | None) -> Any:
    def product(inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")

    return product


def _packed_forward(packed: Any, narrow: Any | None, narrow_below: int) -> Any:
    if narrow is None:
        return packed

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if _rows(inputs) < narrow_below:
            return narrow(inputs)
        return packed(inputs)

    return forward


def upcast_wide_products(model: torch.nn.Module) -> int:
    """Makes every Linear of ``model`` that still has a 16-bit weight multiply in
    float32 from ``MIN_ROWS`` rows on; returns how many layers were changed."""
    count = 0
    for module in model.modules():
        if is_plain_linear(module) and module.weight is not None and module.weight.dtype in _16_BIT:
            module.forward = _forward(module)  # type: ignore[method-assign]
            count += 1
    return count


def _forward(linear: torch.nn.Linear) -> Any:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        """In the weight's dtype below ``MIN_ROWS`` rows, else in float32; the result in
        the inputs' dtype (float32 ones: see ``compute_in_float32``)."""
        if _rows(inputs) < MIN_ROWS:
            weight = linear.weight
            product = F.linear(inputs.to(weight.dtype), weight, linear.bias)
            return product.to(inputs.dtype)
        bias = linear.bias.float() if linear.bias is not None else None
        return F.linear(inputs.float(), linear.weight.float(), bias).to(inputs.dtype)

    return forward


def compute_in_float32(model: torch.nn.Module) -> None:
    """Makes ``model``'s activations float32 (see the module's docstring): the input
    embedding's output is widened, and so is every 16-bit parameter and buffer outside
    Linear layers and embeddings (norm weights, rotary tables, a vision tower's patch
    convolution), so that every operator after the embedding computes in float32.
    Linear and embedding weights keep their 16-bit storage: Linear layers take float32
    inputs on either CPU path (``fp16_gemm.pack_linears``, ``upcast_wide_products``).
    A Linear subclass with its own forward, which neither path takes, is widened."""

    def widen(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() if tensor.dtype in _16_BIT else tensor

    for module in model.modules():
        if not (is_plain_linear(module) or isinstance(module, torch.nn.Embedding)):
            module._apply(widen, recurse=False)
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    embedding.register_forward_hook(lambda module, inputs, output: widen(output))
