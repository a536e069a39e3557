"""The CPU paths of Linear layers (``cpu_matmul``) against the products they replace:
weights prepacked for oneDNN, narrow copies kept beside them (plain float32 weights for
MKL, float16 ones for FBGEMM) and timed at start-up, FBGEMM's float16-weight GEMM and
the float32 upcast of wide 16-bit products."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from salience_server.engine import cpu_matmul, fp16_gemm
from tests.conftest import start_server
from tests.helpers import (
    U32_MAX,
    generate,
    open_session,
    random_tokens,
    reference_greedy,
    reference_logprobs,
)
from tests.integration.test_bfloat16 import BF16_TOLERANCE


def test_wide_products_run_in_float32_and_narrow_ones_in_bfloat16() -> None:
    """The upcast path of 16-bit layers float16 cannot hold, for 16-bit and float32
    inputs."""
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    reference = torch.nn.Linear(64, 32)
    reference.load_state_dict({k: v.float() for k, v in linear.state_dict().items()})
    assert cpu_matmul.upcast_wide_products(torch.nn.Sequential(linear)) == 1
    wide = torch.randn(cpu_matmul.MIN_ROWS, 64).to(torch.bfloat16)
    got = linear(wide)
    assert got.dtype == torch.bfloat16
    # Multiplied in float32, rounded once at the end.
    assert torch.equal(got, reference(wide.float()).to(torch.bfloat16))
    narrow = wide[:1]
    assert torch.equal(
        linear(narrow), torch.nn.functional.linear(narrow, linear.weight, linear.bias)
    )
    # float32 activations (``compute_in_float32``): the same products, float32 results,
    # wide ones not rounded to 16 bits.
    assert torch.equal(linear(wide.float()), reference(wide.float()))
    got = linear(narrow.float())
    assert got.dtype == torch.float32 and torch.equal(got, linear(narrow).float())


@pytest.mark.parametrize("narrow_below", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_products_equal_plain_ones(dtype: torch.dtype, narrow_below: int) -> None:
    """Where oneDNN multiplies ``dtype``, a prepacked Linear gives what ``F.linear``
    gives on the plain weight (bit for bit in bfloat16; float32 sums in another order),
    for any number of rows and input layout; a weight tied to an embedding stays plain
    there. Products of fewer than ``narrow_below`` rows take the narrow kernel on its
    own copy: in float32 the plain weight, kept (for the tied head, the embedding's: no
    bytes more); in bfloat16 FBGEMM's on a float16 copy (every weight's), the float32
    product rounded once. Elsewhere nothing is prepacked."""
    embedding, head, layer = _tied_layers(dtype)
    other = torch.nn.Linear(64, 8).to(torch.float64)  # not the model's dtype: left
    weight, bias, head_weight = layer.weight.detach().clone(), layer.bias, embedding.weight
    head_weight = head_weight.detach().clone()
    cpu = torch.device("cpu")
    if not cpu_matmul.prepacks(cpu, dtype):
        x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        assert dtype == torch.bfloat16 or not (torch.backends.mkldnn.is_available() and x86)
        assert dtype == torch.float32 or not (
            torch.ops.mkldnn._is_mkldnn_bf16_supported() and cpu_matmul.has_16_bit_units()
        )
        return
    modules = torch.nn.ModuleList([embedding, head, layer, other])
    copied = weight.numel() + (head_weight.numel() if dtype == torch.bfloat16 else 0)
    assert cpu_matmul.narrow_bytes(modules, dtype) == copied * dtype.itemsize
    assert cpu_matmul.prepack_linears(modules, dtype, narrow_below) == 2
    assert layer.weight.is_mkldnn and head.weight.is_mkldnn and not other.weight.is_mkldnn
    assert not embedding.weight.is_mkldnn and torch.equal(embedding.weight, head_weight)
    fp16_narrow = dtype == torch.bfloat16 and fp16_gemm.has_fp16_gemm()
    for x in _inputs(dtype):
        narrow = x.numel() // x.shape[-1] < narrow_below
        for got, w, b in ((layer(x), weight, bias), (head(x), head_weight, None)):
            want = torch.nn.functional.linear(x, w, b)
            if narrow and fp16_narrow:
                assert got.dtype == dtype
                exact = torch.nn.functional.linear(
                    x.double(), w.double(), None if b is None else b.double()
                )
                # One rounding to bfloat16's 8 significant bits, float32 sums aside.
                assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-5).all()
            elif dtype == torch.bfloat16 or narrow:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_narrow_products_multiply_the_plain_weight_and_wide_ones_the_prepacked() -> None:
    """Which weight each product reads: zeroing the kept plain weight (the layer's own,
    not a copy) changes the products of fewer than ``narrow_below`` rows only."""
    if not _float32_prepacks():
        return
    _, _, layer = _tied_layers(torch.float32)
    plain = layer.weight.detach()
    cpu_matmul.prepack_linears(torch.nn.Sequential(layer), torch.float32, narrow_below=3)
    inputs = {rows: torch.randn(rows, 64) for rows in (1, 2, 3, 8)}
    before = {rows: layer(x) for rows, x in inputs.items()}
    plain.zero_()
    for rows, x in inputs.items():
        if rows < 3:
            assert torch.equal(layer(x), layer.bias.expand(rows, -1))
        else:
            assert torch.equal(layer(x), before[rows])


def test_narrow_copies_are_kept_below_the_first_rows_they_do_not_win() -> None:
    """The rule over measured (narrow, prepacked) pass times: rows are taken in order,
    and the narrow kernel must win by ``NARROW_MARGIN`` for its copy to be kept."""
    below = cpu_matmul.narrow_rows_below
    # float32 on a Xeon with AMX, in ms: MKL's kernels win at 1 and 2 rows.
    assert below({1: (27.0, 35.6), 2: (30.0, 52.1), 4: (43.9, 40.5)}) == 3
    assert below({1: (48.0, 32.0)}) == 0  # float32 on an AVX2 EPYC: never
    assert below({1: (9.5, 10.0)}) == 0  # within the margin: not worth the memory
    assert below({1: (1.0, 2.0), 2: (3.0, 2.0), 4: (1.0, 2.0)}) == 2  # in order
    assert below({rows: (1.0, 2.0) for rows in (1, 2, 4)}) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_kernels_are_timed_against_prepacked_ones_on_models_worth_it(
    tiny_llama_dir, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``narrow_products_below`` times both kinds of product over the layers a forward
    streams, row counts in order until the narrow kernel stops winning, and leaves the
    model's weights as they were; a model under ``MIN_TIMED_BYTES`` is not timed, nor
    one whose narrow copies would take more than ``NARROW_MEMORY_SHARE`` of the memory
    available (in float32 a tied output head's plain weight costs nothing more; in
    bfloat16 each layer gets a float16 copy)."""
    from salience_server.engine import layer_timing

    cpu = torch.device("cpu")
    if not cpu_matmul.prepacks(cpu, dtype):
        assert dtype == torch.bfloat16 or not _float32_prepacks()
        return
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    timed: list[tuple[int, int]] = []

    def fake_pass(products: list[tuple[object, int]], rows: int, *args: object) -> float:
        x = torch.randn(rows, products[0][1], dtype=dtype)
        products[0][0](x)  # type: ignore[operator]
        timed.append((len(products), rows))
        narrow = len(timed) % 2 == 1  # narrow products are timed first
        return {1: 1.0, 2: 1.0}[rows] if narrow else 2.0 if rows == 1 else 1.0

    monkeypatch.setattr(layer_timing, "pass_seconds", fake_pass)
    assert cpu_matmul.narrow_products_below(model, dtype, cpu) == 0
    assert not timed  # a few kilobytes of weights
    monkeypatch.setattr(cpu_matmul, "MIN_TIMED_BYTES", 0)
    assert cpu_matmul.narrow_products_below(model, dtype, cpu) == 2
    layers = len(layer_timing.timed_layers(model))
    assert timed == [(layers, 1), (layers, 1), (layers, 2), (layers, 2)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any(m.weight.is_mkldnn for m in linears)
    copies = sum(m.weight.numel() * dtype.itemsize for m in linears)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if dtype == torch.float32 and head.weight.data_ptr() == embedding.weight.data_ptr():
        copies -= head.weight.numel() * 4
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: 4 * copies)
    assert cpu_matmul.narrow_products_below(model, dtype, cpu) == 2
    timed.clear()
    monkeypatch.setattr(cpu_matmul, "available_memory", lambda: 4 * copies - 1)
    assert cpu_matmul.narrow_products_below(model, dtype, cpu) == 0
    assert not timed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_start_up_keeps_the_products_it_timed(
    tiny_llama_dir, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prepare_linears`` keeps the prepacked weights and narrow copies that
    ``narrow_products_below`` made to time them: each weight is reordered once, every
    layer keeps its own (the prepared model's logits are the plain model's), and the
    narrow ones serve the rows they won."""
    from salience_server.engine import layer_timing

    cpu = torch.device("cpu")
    if not cpu_matmul.prepacks(cpu, dtype):
        assert dtype == torch.bfloat16 or not _float32_prepacks()
        return
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    inputs = torch.tensor([random_tokens(6, seed=3)])
    with torch.inference_mode():
        want = model(inputs).logits.float()
    calls: list[int] = []

    def fake_pass(products: list[tuple[object, int]], rows: int, *args: object) -> float:
        calls.append(rows)
        return 1.0 if len(calls) % 2 == 1 else 2.0  # the narrow kernel (timed first) wins

    reorders: list[torch.Size] = []
    reorder = cpu_matmul._reorder

    def counted(weight: torch.Tensor) -> torch.Tensor:
        reorders.append(weight.shape)
        return reorder(weight)

    monkeypatch.setattr(layer_timing, "pass_seconds", fake_pass)
    monkeypatch.setattr(cpu_matmul, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(cpu_matmul, "_reorder", counted)
    cpu_matmul.prepare_linears(model, cpu, dtype)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.is_mkldnn for m in linears)
    assert len(reorders) == len(linears)
    with torch.inference_mode():
        got = model(inputs).logits.float()  # 6 rows: prepacked products
        one_row = model(inputs[:, :1]).logits.float()  # the narrow ones
    tolerance = 1e-4 if dtype == torch.float32 else BF16_TOLERANCE
    assert (got - want).abs().max().item() < tolerance
    assert (one_row - want[:, :1]).abs().max().item() < tolerance
    dispatching = [m for m in linears if m.forward.__name__ == "forward"]
    assert dispatching  # some layers keep a narrow product


def test_float32_sessions_with_plain_narrow_products_equal_one_forward(
    tiny_llama_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With plain weights for one-row products (the decode steps) and prepacked ones for
    wider ones (the prompt), greedy decoding equals transformers' and every logprob one
    forward pass over the whole sequence."""
    if not _float32_prepacks():
        return
    monkeypatch.setattr(cpu_matmul, "narrow_products_below", lambda *args: 2)
    prompt = random_tokens(20, seed=8)
    server = start_server(str(tiny_llama_dir), dtype="float32", block_size=4, device="cpu")
    try:
        layer = server.engine.runner.model.model.layers[0].mlp.down_proj
        assert layer.weight.is_mkldnn and layer.forward.__name__ == "forward"  # dispatching
        tokens = _greedy_decode_scored(server, prompt, 8)
    finally:
        server.stop()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    decoded = [t.id for t in tokens if not t.is_prefill]
    assert decoded == reference_greedy(model, prompt, 8)
    sequence = prompt + decoded
    assert [t.position for t in tokens] == list(range(1, len(sequence)))
    got = torch.tensor([t.sampled_logprob for t in tokens])
    torch.testing.assert_close(got, _scored(model, sequence), rtol=0, atol=1e-4)


def test_bfloat16_sessions_with_float16_narrow_products_stay_close_to_float32(
    tiny_llama_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where bfloat16 weights are prepacked and FBGEMM is there, one-row products (the
    decode steps) may take its float16-weight kernel on float16 copies, as on an EPYC
    with AVX-512 BF16: every logprob of a greedy decode stays within ``BF16_TOLERANCE``
    of one float32 forward pass over the same tokens, and the layers float16 cannot hold
    (the tiny model has some) stay on oneDNN."""
    cpu = torch.device("cpu")
    if not (cpu_matmul.prepacks(cpu, torch.bfloat16) and fp16_gemm.has_fp16_gemm()):
        assert not cpu_matmul.has_16_bit_units() or not fp16_gemm.has_fp16_gemm()
        return
    monkeypatch.setattr(cpu_matmul, "narrow_products_below", lambda *args: 2)
    prompt = random_tokens(20, seed=9)
    server = start_server(str(tiny_llama_dir), dtype="bfloat16", block_size=4, device="cpu")
    try:
        linears = [
            m for m in server.engine.runner.model.modules() if isinstance(m, torch.nn.Linear)
        ]
        assert all(m.weight.is_mkldnn for m in linears)
        dispatching = [m for m in linears if m.forward.__name__ == "forward"]
        assert 0 < len(dispatching) < len(linears)  # some weights float16 cannot hold
        tokens = _greedy_decode_scored(server, prompt, 8)
    finally:
        server.stop()
    sequence = prompt + [t.id for t in tokens if not t.is_prefill]
    assert len(sequence) == 28
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    got = torch.tensor([t.sampled_logprob for t in tokens])
    assert (got - _scored(model, sequence)).abs().max().item() < BF16_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp16_packed_products_are_float32_products_of_the_same_weights(
    dtype: torch.dtype,
) -> None:
    """A 16-bit Linear whose weight float16 holds exactly multiplies through FBGEMM's
    float16-weight kernel: the float32 product of the same weights and inputs, rounded
    once; its own weight is dropped, a tied one stays with its embedding. A weight
    float16 cannot hold keeps its layer on the upcast path. Where FBGEMM is missing,
    nothing is packed."""
    embedding, head, layer = _tied_layers(dtype)
    misfit = torch.nn.Linear(64, 16, bias=False).to(dtype)
    with torch.no_grad():
        misfit.weight[0, 0] = 1e-7 if dtype == torch.float16 else 1e6  # beyond float16
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    head_weight = embedding.weight.detach().clone()
    model = torch.nn.ModuleList([embedding, head, layer, misfit])
    if not fp16_gemm.has_fp16_gemm():
        assert fp16_gemm.pack_linears(model) == 0 and layer.weight is not None
        return
    expected = 3 if dtype == torch.float16 else 2  # a float16 weight always fits
    assert fp16_gemm.pack_linears(model) == expected
    assert layer.weight is None and head.weight is None
    assert torch.equal(embedding.weight, head_weight)
    assert (misfit.weight is None) == (dtype == torch.float16)
    assert cpu_matmul.upcast_wide_products(model) == 3 - expected
    for x in _inputs(dtype):
        for module, w, b in ((layer, weight, bias), (head, head_weight, None)):
            got = module(x)
            assert got.shape == (*x.shape[:-1], w.shape[0])
            want = torch.nn.functional.linear(
                x.double(), w.double(), None if b is None else b.double()
            )
            # One rounding to 16 bits (8 or 11 significant bits), float32 sums aside.
            assert got.dtype == dtype
            step = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
            assert ((got.double() - want).abs() <= want.abs() * step + 1e-5).all()
            # float32 inputs (the model's activations, ``compute_in_float32``): float32
            # results, float32 sums, no rounding.
            got = module(x.float())
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _greedy_decode_scored(server: Any, prompt: list[int], max_tokens: int) -> list[Any]:
    """The events of a greedy decode of ``max_tokens`` after ``prompt`` in a new
    session, every position after the first scored."""
    tokens, _ = generate(
        server.stub,
        open_session(server.stub),
        append_tokens=prompt,
        max_tokens=max_tokens,
        ignore_eos=True,
        logprobs_ranges=[(1, U32_MAX)],
    )
    return tokens


def _scored(model: Any, sequence: list[int]) -> torch.Tensor:
    """One forward pass's logprob of each token of ``sequence`` after the first."""
    reference = reference_logprobs(model, sequence)
    return reference[:-1].gather(1, torch.tensor(sequence[1:])[:, None])[:, 0]


def _float32_prepacks() -> bool:
    """Whether float32 Linear weights are prepacked here; where not, because this is no
    x86 CPU with AVX2 or newer, or torch was built without oneDNN."""
    if cpu_matmul.prepacks(torch.device("cpu"), torch.float32):
        return True
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert not (torch.backends.mkldnn.is_available() and x86)
    return False


def _tied_layers(dtype: torch.dtype) -> tuple[torch.nn.Embedding, torch.nn.Linear, torch.nn.Linear]:
    """An embedding, an output head tied to it (as in the default model) and a Linear."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(48, 64).to(dtype)
    head = torch.nn.Linear(64, 48, bias=False).to(dtype)
    head.weight = embedding.weight
    return embedding, head, torch.nn.Linear(64, 32).to(dtype)


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """One row, five rows, a 3-D batch and a non-contiguous input."""
    inputs = [torch.randn(1, 64), torch.randn(5, 64), torch.randn(2, 7, 64), torch.randn(64, 3).t()]
    return [x.to(dtype) for x in inputs]
