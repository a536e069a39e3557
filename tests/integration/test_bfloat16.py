"""bfloat16 serving (the CUDA default) against float32, where 16-bit arithmetic is real
and where it is emulated (the Linear layers' own paths: ``test_cpu_matmul``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from salience_server.engine import cpu_matmul, fp16_gemm
from tests.conftest import start_server
from tests.helpers import (
    U32_MAX,
    generate,
    open_session,
    random_tokens,
    reference_logprobs,
)

BF16_TOLERANCE = 0.05
"""Largest logprob difference (nats) between bf16 and fp32 on the tiny model: bf16 keeps
8 bits of mantissa, so logits move by about 1e-2 of their size."""


def _logprobs(server, token_ids: list[int]) -> torch.Tensor:
    """Each token's logprob after its prefix, from one prefill of ``token_ids``."""
    tokens, _ = generate(
        server.stub,
        open_session(server.stub),
        append_tokens=token_ids,
        logprobs_ranges=[(1, U32_MAX)],
    )
    return torch.tensor([t.sampled_logprob for t in tokens])


def _assert_close_in_bf16(full: torch.Tensor, half: torch.Tensor) -> None:
    assert (full - half).abs().max().item() < BF16_TOLERANCE
    assert (full - half).abs().max().item() > 0  # it really ran in bf16


@pytest.mark.parametrize("units", ["this CPU's", "none"])
def test_bfloat16_logprobs_stay_close_to_float32(
    tiny_llama_dir, units: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this CPU as it is, and as a CPU without 16-bit units (where Linear layers take
    the float16-weight kernel and attention computes in float32), with speculation on
    (its start-up measurement times the packed layers)."""
    if units == "none":
        monkeypatch.setattr(cpu_matmul, "has_16_bit_units", lambda: False)
    token_ids = random_tokens(60, seed=17)
    results = []
    for dtype in ("float32", "bfloat16"):
        server = start_server(
            str(tiny_llama_dir), dtype=dtype, block_size=4, speculative="ngram", device="cpu"
        )
        try:
            runner = server.engine.runner
            assert runner.dtype == getattr(torch, dtype)
            # Where bf16 arithmetic is emulated, attention and the KV pool are float32.
            emulated = cpu_matmul.emulates_16_bit(torch.device("cpu"), torch.bfloat16)
            assert emulated or units != "none"
            pool_dtype = torch.float32 if dtype == "float32" or emulated else torch.bfloat16
            assert runner.kv_caches[0][0].dtype == pool_dtype
            head = runner.model.lm_head.weight
            cpu = torch.device("cpu")
            if cpu_matmul.prepacks(cpu, runner.dtype):  # float32; bf16 with 16-bit units
                assert head.is_mkldnn and head.dtype == runner.dtype
            elif emulated and fp16_gemm.has_fp16_gemm():  # packed into float16, dropped
                assert head is None
                # The model's activations are float32 there, and so are its logits.
                embedded = runner.model.model.embed_tokens(torch.tensor([[1]]))
                assert embedded.dtype == torch.float32
                assert runner.model.lm_head(embedded).dtype == torch.float32
            else:
                assert not head.is_mkldnn and head.dtype == runner.dtype
            assert runner.model.model.embed_tokens.weight.dtype == runner.dtype  # untied
            # Where bf16 is emulated, activations are float32 between layers.
            norm_dtype = torch.float32 if emulated else runner.dtype
            assert runner.model.model.norm.weight.dtype == norm_dtype
            results.append(_logprobs(server, token_ids))  # 60 rows: float32 products on CPU
        finally:
            server.stop()
    _assert_close_in_bf16(*results)


def test_bfloat16_logprobs_stay_close_to_float32_where_the_tests_run(tiny_llama_dir) -> None:
    """The same bound on the tests' device, the CPU or (in the GPU check) a GPU's own
    bf16 arithmetic, where the KV pool is bf16 too."""
    token_ids = random_tokens(60, seed=17)
    results = []
    for dtype in ("float32", "bfloat16"):
        server = start_server(str(tiny_llama_dir), dtype=dtype, block_size=4)
        try:
            runner = server.engine.runner
            assert runner.dtype == getattr(torch, dtype)
            if runner.device.type == "cuda":
                assert runner.kv_caches[0][0].dtype == runner.dtype
            results.append(_logprobs(server, token_ids))
        finally:
            server.stop()
    _assert_close_in_bf16(*results)


@pytest.mark.parametrize(
    ("model", "dtype"), [("tiny_llama_dir", "bfloat16"), ("tiny_qwen3_dir", "float16")]
)
def test_emulated_16_bit_models_are_float32_arithmetic_on_16_bit_weights(
    model: str, dtype: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU without 16-bit units, a bf16 (or fp16) model computes in float32 on its
    16-bit weights: a session's logprobs equal one float32 forward pass of the model with
    its weights rounded to that dtype (float32 summation order aside), on both of that
    CPU's Linear paths (the tiny llama has bf16 layers float16 cannot hold: they multiply
    these rows in float32 too, being more than ``MIN_ROWS``). Qwen3 adds norms of its
    queries and keys."""
    monkeypatch.setattr(cpu_matmul, "has_16_bit_units", lambda: False)
    model_dir = request.getfixturevalue(model)
    token_ids = random_tokens(40, seed=5)
    server = start_server(str(model_dir), dtype=dtype, block_size=4, device="cpu")
    try:
        linears = [
            m for m in server.engine.runner.model.modules() if isinstance(m, torch.nn.Linear)
        ]
        if fp16_gemm.has_fp16_gemm() and dtype == "bfloat16":  # both paths are taken
            assert {linear.weight is None for linear in linears} == {True, False}
        tokens, _ = generate(
            server.stub,
            open_session(server.stub),
            append_tokens=token_ids,
            max_tokens=0,
            logprobs_ranges=[(1, U32_MAX)],
        )
    finally:
        server.stop()
    got = torch.tensor([t.sampled_logprob for t in tokens])
    rounded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    rounded = rounded.float()
    reference = reference_logprobs(rounded, token_ids)
    want = reference[:-1].gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_emulated_bfloat16_image_is_float32_arithmetic_on_bfloat16_weights(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a Qwen2-VL session with an image between text: its logprobs equal a
    float32 forward pass on the bf16-rounded weights, the image's pixels included (they
    reach the vision tower unrounded). Every product is made in float32 here
    (``MIN_ROWS`` 0), as the tiny model has layers float16 cannot hold."""
    from tests.tiny_models import build_tiny_vision_model
    from tests.vision_support import append_pieces, make_image, reference_inputs

    monkeypatch.setattr(cpu_matmul, "has_16_bit_units", lambda: False)
    monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 0)
    model_dir = build_tiny_vision_model(tmp_path, "qwen2_vl")
    pieces = [[10, 20, 30], make_image(1), [60, 70, 80, 90]]
    server = start_server(
        str(model_dir), dtype="bfloat16", block_size=4, kv_cache_bytes=4 << 20, device="cpu"
    )
    try:
        _, events = append_pieces(server, open_session(server.stub), pieces)
        inputs = reference_inputs(server, pieces)
    finally:
        server.stop()
    rounded = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = rounded.float().eval()(**inputs).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    token_ids = inputs["input_ids"][0]
    scored = [e for e in events if e.position > 0]
    assert len(scored) == 7  # the text tokens after the first, and the vision end
    got = torch.tensor([e.sampled_logprob for e in scored])
    want = torch.stack([logprobs[e.position - 1, token_ids[e.position]] for e in scored])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
