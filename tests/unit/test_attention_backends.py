"""The SDPA attention backend against dense attention (the oracle); flash-attn's is
``test_flash_attention_backend.py``, their selection ``test_attention_selection.py``."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from salience_server.engine import (
    few_row_attention,
    sdpa_attention,
)
from salience_server.engine.sdpa_attention import SdpaBackend
from tests.attention_support import HEAD_DIM, MIXED_BATCH, NUM_HEADS
from tests.attention_support import attend_batch as _attend_batch
from tests.helpers import TEST_DEVICE


@pytest.mark.parametrize("block_size", [4, 16])
def test_sdpa_backend_equals_dense_attention(block_size: int) -> None:
    backend = SdpaBackend(block_size, workspace_blocks=64, device=torch.device("cpu"))
    got, want = _attend_batch(backend, block_size, MIXED_BATCH)
    assert (got - want).abs().max().item() < 1e-5


def test_masked_chunks_expand_their_key_heads_on_a_gpu_and_still_equal_dense_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA a masked SDPA call with grouped heads runs torch's math kernel (flash
    takes no mask), whose float32 scores are gigabytes for long chunks: there the keys
    and values go once per query head, so the memory-efficient kernel takes the mask."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sdpa_attention.expands_heads(cuda, True, 4, 2)
    assert not sdpa_attention.expands_heads(cuda, False, 4, 2)  # is_causal or one row
    assert not sdpa_attention.expands_heads(cuda, True, 4, 4)
    assert not sdpa_attention.expands_heads(cpu, True, 4, 2)
    # The CUDA choice, taken on this CPU: the same attention, and no masked grouped call.
    monkeypatch.setattr(
        sdpa_attention, "expands_heads", lambda device, masked, h, hkv: masked and h != hkv
    )
    calls: list[tuple[bool, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        if args[0].dim() == 4:  # the backend's calls ([1, H, q, D]), not the oracle's
            calls.append((kwargs.get("attn_mask") is not None, kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention.F, "scaled_dot_product_attention", spy)
    backend = SdpaBackend(4, workspace_blocks=64, device=cpu)
    shapes = [(20, 30), (0, 25), (3, 9), (40, 1)]  # masked chunks, an all-new prefill
    got, want = _attend_batch(backend, 4, shapes, heads=(6, 2))
    assert (got - want).abs().max().item() < 1e-5
    assert (True, False) in calls and (True, True) not in calls
    assert (False, True) in calls  # the all-new prefill keeps is_causal, grouped


def test_sdpa_backend_attends_16_bit_queries_in_their_dtype() -> None:
    """A bfloat16 pool and queries (a bf16 model where the arithmetic is real; where it
    is emulated, the model's activations and pool are float32): the output is the
    float32 oracle's within bfloat16 arithmetic's error (8 significant bits, relative
    to the largest output; measured: under 2**-8.5 of it)."""
    backend = SdpaBackend(16, 64, torch.device("cpu"))
    got, want = _attend_batch(backend, 16, MIXED_BATCH, seed=3, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() <= 2.0**-7 * want.abs().max().item()


def _decode_rows(shapes: list[tuple[int, int]]) -> list[int]:
    """The batch rows of the sequences that feed one token."""
    rows, start = [], 0
    for _, new in shapes:
        if new == 1:
            rows.append(start)
        start += new
    return rows


DECODES = [(29, 1), (0, 1), (40, 1)]
# Few-row sequences (decodes, a verification pass, short appends) beside a prefill too
# long to join them, and two whose contexts are too long to pad the others to (19 and 5
# blocks of 16 beside 3, 2, 2, 1 and 1).
FEW_ROWS = [(13, 5), (29, 1), (0, 1), (300, 1), (40, 1), (3, 9), (0, 20), (77, 2)]


@pytest.mark.parametrize(
    ("shapes", "calls_wanted"),
    [
        (DECODES, [(3, 1)]),
        ([(50, 1)], [(1, 1)]),
        ([(60, 5)], [(1, 5)]),
        (FEW_ROWS, [(5, 9), (1, 1), (1, 2), (1, 20)]),
    ],
    ids=["decode-group", "decode-alone", "verification-alone", "few-row-group"],
)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["3-per-key-head", "1-per-key-head"])
def test_sdpa_backend_attends_few_rows_as_query_rows_of_their_key_head(
    shapes: list[tuple[int, int]],
    calls_wanted: list[tuple[int, int]],
    heads: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sequences of up to ``MAX_FOLDED_ROWS`` rows go to SDPA as the query rows of their
    key head ([B, Hkv, H / Hkv * q, D], without ``enable_gqa``, which reads each key
    head once per query head): several in one call, padded to the most rows and the
    longest context, except a context too long to pad the others to; alone, one call.
    A longer sequence keeps ``enable_gqa``. All equal dense attention. ``calls_wanted``:
    (sequences, rows) of each SDPA call."""
    calls: list[tuple[tuple[int, ...], bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.dim() == 4:  # the backend's (the oracle's are [H, q, D])
            calls.append((tuple(query.shape), bool(kwargs.get("enable_gqa"))))
            # Masks come made for SDPA (``sdpa_mask``): additive, one row per query row
            # (folded ones included), or one row for them all.
            mask = kwargs.get("attn_mask")
            assert mask is None or (
                mask.dtype == query.dtype and mask.shape[-2] in (1, query.shape[2])
            )
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(few_row_attention.F, "scaled_dot_product_attention", spy)
    num_heads, num_kv_heads = heads
    group = num_heads // num_kv_heads
    backend = SdpaBackend(16, 64, torch.device("cpu"))
    got, want = _attend_batch(backend, 16, shapes, seed=4, heads=heads)
    assert (got - want).abs().max().item() < 1e-5
    wanted = [
        ((count, num_kv_heads, group * rows, HEAD_DIM), False)
        if rows <= few_row_attention.MAX_FOLDED_ROWS
        else ((count, num_heads, rows, HEAD_DIM), True)
        for count, rows in calls_wanted
    ]
    assert sorted(calls) == sorted(wanted)


@pytest.mark.parametrize("shapes", [FEW_ROWS, [(50, 1)]], ids=["grouped", "alone"])
def test_sdpa_backend_attends_16_bit_decode_rows_within_bfloat16_error(
    shapes: list[tuple[int, int]],
) -> None:
    """Three query heads a key head: 16-bit decode rows go to torch's 16-bit kernel as
    three query rows (as fast as or faster than upcasting, measured), and so do the
    few-row group's padded rows, all within bfloat16 attention's error of the float32
    oracle, as prefill rows are."""
    backend = SdpaBackend(16, 64, torch.device("cpu"))
    got, want = _attend_batch(backend, 16, shapes, seed=5, dtype=torch.bfloat16, heads=(6, 2))
    assert (got.float() - want).abs().max().item() <= 2.0**-7 * want.abs().max().item()


@pytest.mark.parametrize("shapes", [DECODES, [(50, 1)]], ids=["grouped", "alone"])
def test_sdpa_backend_attends_16_bit_single_query_rows_in_float32(
    shapes: list[tuple[int, int]],
) -> None:
    """One query head a key head: a decode is then a single query row, which torch's
    16-bit CPU kernel took 2-4x as long on as float32 did, upcast included; it is
    attended in float32 on the same 16-bit keys and values and rounded once: each
    output is the float32 oracle's within one bfloat16 rounding of itself. (Padded
    beside longer sequences in a group, a decode has several rows and stays 16-bit.)"""
    backend = SdpaBackend(16, 64, torch.device("cpu"))
    got, want = _attend_batch(backend, 16, shapes, seed=5, dtype=torch.bfloat16, heads=(4, 4))
    rows = _decode_rows(shapes)
    got, want = got[rows].float(), want[rows]
    assert ((got - want).abs() <= want.abs() * 2.0**-8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["3-per-key-head", "1-per-key-head"])
@pytest.mark.parametrize("is_scattered", [True, False], ids=["scattered", "consecutive"])
def test_sdpa_backend_on_the_test_device_equals_dense_attention(
    dtype: torch.dtype, heads: tuple[int, int], is_scattered: bool
) -> None:
    """On the device the suite runs on (``SALIENCE_TEST_DEVICE``: CUDA in
    ``scripts/gpu_check.sh``), where SDPA picks its kernels by dtype, mask and strides:
    the pool's gathered blocks, its views (consecutive blocks) and the few-row group's
    stride-0 and padded inputs all give dense attention, within float32's or bfloat16's
    error."""
    device = torch.device(TEST_DEVICE)
    backend = SdpaBackend(16, 64, device)
    shapes = MIXED_BATCH + FEW_ROWS
    got, want = _attend_batch(
        backend,
        16,
        shapes,
        seed=8,
        dtype=dtype,
        heads=heads,
        device=device,
        is_scattered=is_scattered,
    )
    scale = want.abs().max().item()
    tolerance = (1e-5 if device.type == "cpu" else 1e-4) if dtype == torch.float32 else 2.0**-7
    assert (got.float() - want).abs().max().item() <= tolerance * max(scale, 1.0)


def _decode_spans(*context_lens: int) -> list[types.SimpleNamespace]:
    return [types.SimpleNamespace(query_len=1, context_len=length) for length in context_lens]


def test_decode_group_takes_every_decode_whose_padding_stays_within_bounds() -> None:
    """Contexts of similar length go into one padded group, in the batch's order; the
    longest leave it while padding to them would exceed twice the blocks the contexts
    fill, or the workspace; fewer than two make no group. A verification pass joins; a
    sequence of more than ``MAX_FOLDED_ROWS`` rows never does."""
    prefill = types.SimpleNamespace(query_len=few_row_attention.MAX_FOLDED_ROWS + 1, context_len=40)
    verification = types.SimpleNamespace(query_len=5, context_len=55)
    similar = _decode_spans(60, 64, 50, 33)  # 4, 4, 4 and 3 blocks of 16
    got = few_row_attention.group_members([prefill, *similar, verification], 16, 1000)
    assert [span.context_len for span in got] == [60, 64, 50, 33, 55]
    outlier = _decode_spans(20, 300, 30, 16)  # 19 blocks beside 2, 2 and 1
    got = few_row_attention.group_members(outlier, 16, 1000)
    assert [span.context_len for span in got] == [20, 30, 16]
    # Two decodes pad to at most twice their blocks: they always group where they fit.
    got = few_row_attention.group_members(_decode_spans(300, 30), 16, 1000)
    assert [span.context_len for span in got] == [300, 30]
    assert few_row_attention.group_members(_decode_spans(300, 290), 16, 20) == []
    assert few_row_attention.group_members(_decode_spans(64), 16, 1000) == []
    # Four decodes of 4 blocks pad to 16: a 12-block workspace takes the three shorter.
    got = few_row_attention.group_members(_decode_spans(64, 63, 62, 61), 16, 12)
    assert [span.context_len for span in got] == [63, 62, 61]


@pytest.mark.parametrize(
    ("shapes", "first_row"),
    [
        (DECODES, 0),
        ([(13, 5), (29, 5), (40, 5)], 0),  # verification passes of one width
        ([(0, 20), (29, 1), (0, 1), (40, 1)], 20),  # after a prefill
        ([(29, 1), (0, 1), (40, 1), (0, 20)], 0),  # before one
        ([(29, 1), (0, 20), (40, 1)], None),  # a prefill between them
        ([(13, 5), (29, 1), (40, 1)], None),  # rows padded to the widest
    ],
    ids=["decodes", "verifications", "after-prefill", "before-prefill", "split", "padded"],
)
def test_a_group_of_consecutive_rows_takes_them_as_a_slice_and_equals_dense_attention(
    shapes: list[tuple[int, int]], first_row: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the group's rows are consecutive in the batch, all of one width, the group
    reads its queries and writes its rows as one slice (``FewRowGroup.first_row``);
    otherwise it picks and places them by index. Either way: dense attention."""
    seen: list[int | None] = []
    attend_group = sdpa_attention.attend_group

    def spy(query: torch.Tensor, key_cache: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(args[1].first_row)
        return attend_group(query, key_cache, *args)

    monkeypatch.setattr(sdpa_attention, "attend_group", spy)
    backend = SdpaBackend(16, 64, torch.device("cpu"))
    got, want = _attend_batch(backend, 16, shapes, seed=7, heads=(6, 2))
    assert (got - want).abs().max().item() < 1e-5
    assert seen == [first_row]


def test_sdpa_backend_attends_a_long_decode_beside_a_group_and_equals_dense_attention() -> None:
    """A decode over a long context attends alone; the short ones in one padded call."""
    backend = SdpaBackend(4, workspace_blocks=256, device=torch.device("cpu"))
    shapes = [(300, 1), (7, 1), (0, 6), (12, 1), (9, 1)]
    got, want = _attend_batch(backend, 4, shapes, seed=6)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize(("name", "feature"), [("softcap", "softcapping"), ("s_aux", "sinks")])
def test_attention_features_it_does_not_implement_are_an_error(name: str, feature: str) -> None:
    backend = SdpaBackend(4, workspace_blocks=8, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=feature):
        _attend_batch(backend, 4, [(0, 3)], extra={name: torch.ones(NUM_HEADS)})
