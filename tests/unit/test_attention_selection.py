"""Which attention backend runs, with which block size, and why another cannot: chosen
from the device, the dtype, the head size and whether flash-attn is installed (a
stand-in module here: no CUDA)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from salience_server.engine import flash_attention, paged_attention
from salience_server.engine.flash_attention import FlashAttentionBackend
from salience_server.engine.sdpa_attention import SdpaBackend
from tests import flash_reference


def test_auto_selects_sdpa_on_cpu_and_flash_attn_asked_for_on_cpu_says_why() -> None:
    cpu = torch.device("cpu")
    backend = paged_attention.select_backend("auto", cpu, torch.float32, 64, 16, 8)
    assert isinstance(backend, SdpaBackend)
    with pytest.raises(ValueError, match="flash-attn runs on CUDA only"):
        paged_attention.select_backend("flash-attn", cpu, torch.float32, 64, 16, 8)


def test_flash_attn_unsupported_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")  # a device object only: nothing is allocated on it
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails: not installed
    assert "not installed" in (flash_attention.unsupported_reason(cuda, torch.bfloat16, 64) or "")
    assert "float16 or bfloat16" in (
        flash_attention.unsupported_reason(cuda, torch.float32, 64) or ""
    )
    assert "head sizes" in (flash_attention.unsupported_reason(cuda, torch.float16, 512) or "")
    old = types.ModuleType("flash_attn")  # its causal mask aligned to the top left
    old.flash_attn_varlen_func = flash_reference.flash_attn_varlen_func  # type: ignore[attr-defined]
    old.__version__ = "2.0.9"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", old)
    reason = flash_attention.unsupported_reason(cuda, torch.float16, 64) or ""
    assert "flash-attn 2.0.9 is older than 2.3" in reason


def test_auto_selects_flash_attn_on_cuda_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_reference.flash_attn_varlen_func  # type: ignore[attr-defined]
    fake.__version__ = "2.7.4.post1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    cuda = torch.device("cuda")
    assert flash_attention.unsupported_reason(cuda, torch.bfloat16, 64) is None
    gathered = paged_attention.select_backend("auto", cuda, torch.bfloat16, 64, 16, 8)
    paged = paged_attention.select_backend("flash-attn", cuda, torch.float16, 64, 256, 8)
    assert isinstance(gathered, FlashAttentionBackend) and not gathered.paged
    assert isinstance(paged, FlashAttentionBackend) and paged.paged
    fallback = paged_attention.select_backend("auto", cuda, torch.float32, 64, 16, 8)
    assert isinstance(fallback, SdpaBackend)


def test_default_block_size_is_256_only_where_the_paged_kernel_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_reference.flash_attn_varlen_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert paged_attention.default_block_size("auto", cuda, torch.bfloat16, 64) == 256
    assert paged_attention.default_block_size("flash-attn", cuda, torch.float16, 64) == 256
    assert paged_attention.default_block_size("sdpa", cuda, torch.bfloat16, 64) == 16
    assert paged_attention.default_block_size("auto", cuda, torch.float32, 64) == 16
    assert paged_attention.default_block_size("auto", cpu, torch.float32, 64) == 16

    def old_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):  # type: ignore[no-untyped-def]
        raise AssertionError("not called")

    fake.flash_attn_varlen_func = old_kernel  # type: ignore[attr-defined]
    assert paged_attention.default_block_size("auto", cuda, torch.bfloat16, 64) == 16
