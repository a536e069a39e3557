"""What float32 means on a GPU: float32 arithmetic, not TF32."""

from __future__ import annotations

import torch

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
