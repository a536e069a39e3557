"""What arithmetic a dtype gets: float32 on a GPU is float32, not TF32; a 16-bit dtype
on a CPU without units for it computes in float32."""

from __future__ import annotations

import pytest
import torch

from salience_server.engine import cpu_matmul
from salience_server.engine.loader import keep_float32_exact


def test_a_float32_model_on_cuda_turns_tf32_off_and_others_leave_it() -> None:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        keep_float32_exact(torch.device("cuda"), torch.bfloat16)
        keep_float32_exact(torch.device("cpu"), torch.float32)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        keep_float32_exact(torch.device("cuda"), torch.float32)
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(
    ("bf16_units", "fp16_units", "emulated"),
    [
        (True, True, set()),  # AMX-FP16, or AVX-512 FP16 beside AVX-512 BF16
        (True, False, {torch.float16}),  # an EPYC with AVX-512 BF16 only
        (False, False, {torch.bfloat16, torch.float16}),  # AVX2
    ],
)
def test_a_16_bit_dtype_is_emulated_where_the_cpu_has_no_units_for_it(
    monkeypatch: pytest.MonkeyPatch, bf16_units: bool, fp16_units: bool, emulated: set
) -> None:
    """float16 on a CPU with bf16 units only took torch's slow float16 kernels (a decode
    step 1.5x the emulated one's, a long prefill 2.4x bf16's)."""
    monkeypatch.setattr(cpu_matmul, "has_16_bit_units", lambda: bf16_units)
    monkeypatch.setattr(cpu_matmul, "_mkldnn_float16", lambda: fp16_units)
    cpu = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        assert cpu_matmul.emulates_16_bit(cpu, dtype) == (dtype in emulated)
    assert not cpu_matmul.emulates_16_bit(cpu, torch.float32)
    assert not cpu_matmul.emulates_16_bit(torch.device("cuda"), torch.float16)
