"""bfloat16 serving (the CUDA default) against float32, and its CPU matmul path."""

from __future__ import annotations

import torch

from salience_server.engine import cpu_matmul
from tests.conftest import start_server
from tests.helpers import U32_MAX, generate, open_session, random_tokens

BF16_TOLERANCE = 0.05
"""Largest logprob difference (nats) between bf16 and fp32 on the tiny model: bf16 keeps
8 bits of mantissa, so logits move by about 1e-2 of their size."""


def test_bfloat16_logprobs_stay_close_to_float32(tiny_llama_dir) -> None:
    token_ids = random_tokens(60, seed=17)
    results = []
    for dtype in ("float32", "bfloat16"):
        server = start_server(str(tiny_llama_dir), dtype=dtype, block_size=4)
        try:
            assert server.engine.runner.dtype == getattr(torch, dtype)
            # Where bf16 arithmetic is emulated, attention and the KV pool are float32.
            emulated = cpu_matmul.emulates_16_bit(torch.device("cpu"), torch.bfloat16)
            pool_dtype = torch.float32 if dtype == "float32" or emulated else torch.bfloat16
            assert server.engine.runner.kv_caches[0][0].dtype == pool_dtype
            # Where bf16 is native, the Linear weights are kept prepacked for oneDNN.
            prepacked = dtype == "bfloat16" and cpu_matmul.prepacks_16_bit(
                torch.device("cpu"), torch.bfloat16
            )
            assert server.engine.runner.model.lm_head.weight.is_mkldnn == prepacked
            tokens, _ = generate(
                server.stub,
                open_session(server.stub),
                append_tokens=token_ids,  # 60 rows: the float32 product path on CPU
                logprobs_ranges=[(1, U32_MAX)],
            )
            results.append(torch.tensor([t.sampled_logprob for t in tokens]))
        finally:
            server.stop()
    full, half = results
    assert (full - half).abs().max().item() < BF16_TOLERANCE
    assert (full - half).abs().max().item() > 0  # it really ran in bf16


def test_wide_products_run_in_float32_and_narrow_ones_in_bfloat16() -> None:
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


def test_prepacked_bfloat16_products_equal_plain_ones() -> None:
    """Where oneDNN multiplies bfloat16, a prepacked Linear gives bit for bit what
    ``F.linear`` gives on the plain weight, for any number of rows and input layout; a
    weight tied to an embedding stays plain there. Elsewhere nothing is prepacked."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(48, 64).to(torch.bfloat16)
    head = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    head.weight = embedding.weight  # tied, as in the default model
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    weight, bias, head_weight = layer.weight.detach().clone(), layer.bias, embedding.weight
    head_weight = head_weight.detach().clone()
    cpu = torch.device("cpu")
    if not cpu_matmul.prepacks_16_bit(cpu, torch.bfloat16):
        assert not cpu_matmul.prepacks_16_bit(cpu, torch.float32)
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported() or not (
            cpu_matmul.has_16_bit_units()
        )
        return
    assert cpu_matmul.prepack_linears(torch.nn.ModuleList([embedding, head, layer])) == 2
    assert layer.weight.is_mkldnn and head.weight.is_mkldnn
    assert not embedding.weight.is_mkldnn and torch.equal(embedding.weight, head_weight)
    inputs = [
        torch.randn(1, 64),
        torch.randn(5, 64),
        torch.randn(2, 7, 64),
        torch.randn(64, 3).t(),  # not contiguous
    ]
    for x in (x.to(torch.bfloat16) for x in inputs):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias))
        assert torch.equal(head(x), torch.nn.functional.linear(x, head_weight))
