"""Runs the model over a flattened batch with paged KV storage. Holds no policy."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from salience_server.engine import (
    cpu_matmul,
    decoder_layers,
    fused_linears,
    paged_attention,
    sdpa_attention,
)
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.conversion import in_one_line
from salience_server.engine.evictor import KvMove, SwapIn, SwapOut
from salience_server.engine.flash_attention import FlashAttentionBackend
from salience_server.engine.model_shape import decoder_parts, kv_shape
from salience_server.engine.readout import Readout
from salience_server.engine.uploads import Uploads

log = logging.getLogger(__name__)


def kv_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for a model in ``dtype``: float32 where 16-bit arithmetic is
    emulated, since activations and attention are float32 there
    (``cpu_matmul.compute_in_float32``): torch's emulated bfloat16 SDPA took 0.71 ms for
    one decode query over 900 cached tokens against 0.27 ms in float32 (4.6 against 0.92
    ms over 4,000), and a 16-bit pool would be upcast at every layer of every step (at
    1,400 cached tokens, 10 ms of a 120 ms default-model bf16 step). The model's dtype
    elsewhere."""
    return torch.float32 if cpu_matmul.emulates_16_bit(device, dtype) else dtype


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token needs across all layers."""
    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


HostKv = list[tuple[torch.Tensor, torch.Tensor]]
"""An offloaded session's KV: per layer (keys, values), [num_blocks, block_size, Hkv, D]."""
PlannedMove = tuple[KvMove, HostKv | None]
"""A KV move, with the host KV a swap-in restores."""


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    """[K, V] logits at the batch's logits_rows."""
    readout: torch.Tensor | None
    """[R, n_layers, n_concepts] float32 at the batch's readout_rows, or None."""
    embeddings: torch.Tensor | None = None
    """[E, hidden] float32 final hidden states at the batch's embed_rows, or None."""


class _FirstPassFailed(ValueError):
    """The start-up pass failed (the error is its cause)."""


class ModelRunner:
    """Owns the model and the KV pool tensors; executes ForwardBatches."""

    def __init__(
        self,
        model: Any,
        num_blocks: int,
        block_size: int,
        attention: str | paged_attention.AttentionBackend = "auto",
    ) -> None:
        """``attention`` names a backend (see ``paged_attention.select_backend``) or is
        one already built."""
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head = model.get_output_embeddings()
        self.logits_width = int(head.out_features)
        """V of the [K, V] logits (the output layer's, which may differ from the
        embedding's rows)."""
        # Projections of one input stacked first, so that the CPU paths see them as one.
        fused_linears.fuse_projections(model)
        cpu_matmul.prepare_linears(model, self.device, self.dtype)
        decoder_layers.streamline(model)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._allocate_pool()
        # Attention gathers one layer's blocks at a time: a workspace as large as the
        # pool in blocks costs 1 / num_layers of its memory, and holds any sequence or
        # few-row group (padded) up to the pool's size.
        self._workspace_blocks = num_blocks
        if isinstance(attention, str):
            head_dim = kv_shape(model.config)[2]
            attention = paged_attention.select_backend(
                attention, self.device, self.dtype, head_dim, block_size, self._workspace_blocks
            )
        self.attention = attention
        self.readout: Readout | None = None
        self._capture_rows: torch.Tensor | None = None
        self._embed_rows: torch.Tensor | None = None
        self._embeddings: torch.Tensor | None = None
        parts = decoder_parts(model)
        assert parts is not None, "the loader refuses a decoder without its parts"
        self.layers: Any = parts[0]
        """The decoder's layers (``model_shape.decoder_parts``)."""
        parts[1].register_forward_hook(self._capture_final_states)  # its final norm
        self._captured: list[torch.Tensor] = []
        # Offloaded sessions' KV: per layer (keys, values), [num_blocks, block_size, Hkv, D].
        self.host_kv: dict[str, HostKv] = {}
        self._swapping_out: dict[str, list[int]] = {}
        """Sessions whose swap-out is being copied -> the trims (block counts; 0 is a
        discard) asked for meanwhile."""
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self._slot = paged_attention.BatchSlot()
        paged_attention.attach_slot(model, self._slot)

    def warm_up(self, uses_mrope: bool, may_fall_back: bool) -> None:
        """One two-token forward pass before serving, so that an attention kernel that
        cannot run on this device fails at start rather than on every call. flash-attn
        picked by ``auto`` then falls back to SDPA; asked for by name, it is an error.
        The pass writes into block 0, which holds nothing yet. Each layer must attend
        through the paged function once: one that attends some other way would see only
        the tokens of each call, and one that attends twice (DiffLlama's two value
        halves) would overwrite its own KV, so every answer after the first call would
        be wrong. Any failure is a ValueError of one line."""
        batch = ForwardBatch.synthetic(0, 2, self.block_size, uses_mrope)
        try:
            calls = self._counted_pass(batch)
        except _FirstPassFailed as failed:
            if not isinstance(self.attention, FlashAttentionBackend):
                raise
            error = in_one_line(failed.__cause__ or failed)  # a CUDA error runs on
            if not may_fall_back:
                raise ValueError(
                    f"--attention-backend flash-attn: a first forward pass failed ({error})"
                ) from failed.__cause__
            log.warning("flash-attn failed on a first forward pass (%s); using torch SDPA", error)
            self.attention = sdpa_attention.SdpaBackend(
                self.block_size, self._workspace_blocks, self.device
            )
            calls = self._counted_pass(batch)
        name = type(self.model).__name__
        unwritten = [i for i, (keys, _) in enumerate(self.kv_caches) if not bool(keys[0].any())]
        if unwritten:
            raise paged_attention.UnsupportedAttention(
                f"{name}: the model's layers {unwritten} do not attend through transformers' "
                "attention interface, which Salience's paged KV cache needs: this "
                "architecture is not supported"
            )
        repeated = [layer for layer, count in enumerate(calls) if count > 1]
        if repeated:
            raise paged_attention.UnsupportedAttention(
                f"{name}: the model's layers {repeated} attend more than once per forward pass, "
                "where Salience's paged KV cache keeps one key and value per layer and "
                "token: this architecture is not supported"
            )

    def _counted_pass(self, batch: ForwardBatch) -> list[int]:
        """Runs ``batch`` with each layer's attention calls counted (and their keys and
        values checked against the pool: ``paged_attention``); a failure other than
        ``UnsupportedAttention`` comes as ``_FirstPassFailed``, in one line."""
        name = type(self.model).__name__
        calls = [0] * len(self.kv_caches)
        self._slot.calls = calls
        try:
            self.execute(batch)
        except paged_attention.UnsupportedAttention as error:
            raise paged_attention.UnsupportedAttention(f"{name}: {error}") from None
        except Exception as error:
            raise _FirstPassFailed(
                f"{name}: a first forward pass failed "
                f"({in_one_line(error)}); is the architecture one Salience can run?"
            ) from error
        finally:
            self._slot.calls = None
        return calls

    def _allocate_pool(self) -> None:
        """One (keys, values) pair per layer: [num_blocks, block_size, Hkv, D] each, zeros."""
        num_layers, num_kv_heads, head_dim = kv_shape(self.model.config)
        shape = (self.num_blocks, self.block_size, num_kv_heads, head_dim)
        pool_dtype = kv_dtype(self.device, self.dtype)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=pool_dtype, device=self.device),
                torch.zeros(shape, dtype=pool_dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]

    def release_pool(self) -> None:
        """Gives the KV pool and attention's workspace back to the device, before it
        serves (``kv_pool.fit_pool`` measures the memory left without them); nothing
        runs until ``resize_pool``."""
        self.kv_caches = []
        self.attention.resize_workspace(0)

    def resize_pool(self, num_blocks: int) -> None:
        """A new, empty pool of ``num_blocks`` blocks, and attention's workspace to
        match, before the runner serves: what the old pool held is dropped."""
        self.release_pool()
        self.num_blocks = self._workspace_blocks = num_blocks
        self._allocate_pool()
        self.attention.resize_workspace(num_blocks)

    def enable_readout(self, readout: Readout) -> None:
        """Captures the readout layers' outputs at the rows a batch asks for."""
        # The concept vectors live beside the model: no host-to-device copy per step.
        readout = dataclasses.replace(readout, vectors=readout.vectors.to(self.device))
        self.readout = readout
        self._captured = [torch.empty(0, device=self.device)] * len(readout.layers)
        layers = self.layers
        for slot, layer_index in enumerate(readout.layers):
            layers[layer_index].register_forward_hook(self._capture_hook(slot))

    def _capture_hook(self, slot: int) -> Any:
        def capture(module: Any, inputs: Any, output: Any) -> None:
            if self._capture_rows is not None:
                hidden = output[0] if isinstance(output, tuple) else output  # [1, T, H]
                self._captured[slot] = hidden[0, self._capture_rows]

        return capture

    def _capture_final_states(self, module: Any, inputs: Any, output: Any) -> None:
        """Keeps the final norm's output at the embed rows ([1, T, H] -> [E, H])."""
        if self._embed_rows is not None:
            self._embeddings = output[0, self._embed_rows].float()

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch, uploads: Uploads | None = None) -> ForwardOutput:
        """Runs one forward pass: logits at ``batch.logits_rows``, readout at
        ``batch.readout_rows``. ``uploads``: the step's other inputs (the sampler's),
        sent with the forward's."""
        device = self.device
        # Every input goes to the device in one copy (``uploads``).
        uploads = uploads if uploads is not None else Uploads(device)
        metadata = self.attention.build_metadata(
            batch.sequences, batch.slot_mapping, self.kv_caches, uploads
        )
        token_ids = uploads.add(batch.token_ids)
        if batch.rope_positions:  # the t row, then the h row, then the w row
            axes = zip(*batch.rope_positions, strict=True)
            positions = uploads.add([position for axis in axes for position in axis])
        else:
            positions = uploads.add(batch.positions)
        logits_rows = uploads.add(batch.logits_rows)  # [K]
        capture_rows = uploads.add(batch.readout_rows if self.readout is not None else [])
        embed_rows = uploads.add(batch.embed_rows)
        uploads.send()
        input_ids = token_ids.tensor[None]  # [1, T]
        position_ids = positions.tensor.view(-1, 1, batch.num_tokens)  # [1 or 3, 1, T]
        if not batch.rope_positions:
            position_ids = position_ids[0]  # [1, T]
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if batch.embeds:
            embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, H]
            for first_row, rows in batch.embeds:
                embeds[0, first_row : first_row + rows.shape[0]] = rows.to(device, embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        if capture_rows.length:
            self._capture_rows = capture_rows.tensor
        if embed_rows.length:
            self._embed_rows = embed_rows.tensor
        checked = {} if self._slot.calls is None else {"salience_calls": self._slot.calls}
        self._slot.metadata = metadata
        try:
            output = self.model(
                **inputs,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=logits_rows.tensor,
                salience_batch=metadata,
                **checked,
            )
        finally:
            self._capture_rows = self._embed_rows = None
            self._slot.metadata = None
        embeddings, self._embeddings = self._embeddings, None
        readout = None
        if batch.readout_rows and self.readout is not None:
            readout = self.readout.project(torch.stack(self._captured))  # [R, L, C]
            self._captured = [torch.empty(0, device=self.device)] * len(self.readout.layers)
        return ForwardOutput(
            logits=output.logits[0],
            readout=readout,
            embeddings=embeddings,
        )

    def move_kv(self, moves: list[KvMove]) -> None:
        """Makes a step's KV moves at once (``start_moves``, ``copy_kv``, ``finish_moves``)."""
        self.finish_moves(self.copy_kv(self.start_moves(moves)))

    def start_moves(self, moves: list[KvMove]) -> list[PlannedMove]:
        """Under the engine lock, as the scheduler decides ``moves``: takes the host KV
        that swap-ins restore, and marks the sessions being swapped out, so that a
        discard or trim of their host KV from the event loop waits for the copy."""
        planned: list[PlannedMove] = []
        for move in moves:
            if isinstance(move, SwapIn) and move.session_id in self._swapping_out:
                planned.append((move, None))  # swapped out earlier in this step
            elif isinstance(move, SwapIn):
                planned.append((move, self.host_kv.pop(move.session_id)))
            else:
                if isinstance(move, SwapOut):
                    self._swapping_out[move.session_id] = []
                planned.append((move, None))
        return planned

    def copy_kv(self, planned: list[PlannedMove]) -> dict[str, HostKv]:
        """Without the engine lock (the device works here): makes the moves in the
        order the scheduler decided them (see ``evictor``): evicted sessions' blocks to
        host memory, copy-on-write copies, offloaded sessions' KV back into their new
        blocks. Only the engine thread touches the pool's values. Returns the swapped-out
        sessions' host KV, for ``finish_moves``."""
        swapped_out: dict[str, HostKv] = {}
        for move, host in planned:
            if isinstance(move, SwapOut):
                self.num_swap_outs += 1
                index = self._index(move.block_ids)
                swapped_out[move.session_id] = [
                    (keys[index].to("cpu"), values[index].to("cpu"))
                    for keys, values in self.kv_caches
                ]
            elif isinstance(move, SwapIn):
                if host is None:  # its swap-out came earlier in this step
                    host = swapped_out.pop(move.session_id)
                self.num_swap_ins += 1
                index = self._index(move.block_ids)
                for (keys, values), (host_keys, host_values) in zip(
                    self.kv_caches, host, strict=True
                ):
                    keys[index] = host_keys[: len(index)].to(self.device)
                    values[index] = host_values[: len(index)].to(self.device)
            else:  # all sources are read before any destination is written
                sources = self._index([source for source, _ in move.pairs])
                targets = self._index([target for _, target in move.pairs])
                for keys, values in self.kv_caches:
                    keys[targets] = keys[sources]
                    values[targets] = values[sources]
        return swapped_out

    def finish_moves(self, swapped_out: dict[str, HostKv]) -> None:
        """Under the engine lock: keeps the swapped-out KV, then makes the discards and
        trims that came for it during the copy, in their order. A swap-out whose copy
        failed leaves no host KV (its session then recomputes)."""
        in_flight, self._swapping_out = self._swapping_out, {}
        for session_id, pending in in_flight.items():
            if session_id in swapped_out:
                self.host_kv[session_id] = swapped_out[session_id]
                for num_blocks in pending:
                    self.trim_host_kv(session_id, num_blocks)

    def discard_host_kv(self, session_id: str) -> None:
        self.trim_host_kv(session_id, 0)

    def trim_host_kv(self, session_id: str, num_blocks: int) -> None:
        """Keeps the first ``num_blocks`` blocks of an offloaded session's host KV (none:
        forgets it), now or, while its swap-out is being copied, once it is."""
        if session_id in self._swapping_out:
            self._swapping_out[session_id].append(num_blocks)
            return
        if session_id not in self.host_kv:
            return
        if num_blocks == 0:
            del self.host_kv[session_id]
            return
        if self.host_kv[session_id][0][0].shape[0] <= num_blocks:
            return
        self.host_kv[session_id] = [
            (keys[:num_blocks].clone(), values[:num_blocks].clone())
            for keys, values in self.host_kv[session_id]
        ]

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)
