"""The plain values the client hands to users, and the one exception it raises.

Protobuf messages never leave the client: every response is converted here into a
dataclass whose fields are Python types (enums become lower-case strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from salience_client.pb import salience_pb2 as pb

SESSION_LENGTH_METADATA = "salience-session-length"
"""Trailing metadata key of an OFFSET_MISMATCH error: the server's session length."""


def _enum_name(enum_type: object, value: int, prefix: str) -> str:
    """``FINISH_REASON_STOP_STRING`` -> ``stop_string``; unknown numbers -> ``unspecified``."""
    try:
        name: str = enum_type.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return "unspecified"
    return name.removeprefix(prefix).lower()


@dataclass
class ReadoutManifest:
    """Which layers and concepts a readout covers (``GetModelInfo``)."""

    layers: list[int]
    concepts: list[str]


@dataclass
class ReadoutValues:
    """One token's readout: ``values[i][j]`` is layer ``layers[i]``'s hidden state
    projected onto concept ``concepts[j]``."""

    layers: list[int]
    concepts: list[str]
    values: list[list[float]]
    """[n_layers][n_concepts]."""

    def __getitem__(self, key: tuple[int, str]) -> float:
        """``readout[layer, concept]``; KeyError naming the ones read out for a layer or
        concept that was not (it was list.index's ValueError)."""
        layer, concept = key
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not read out; the layers are {self.layers}")
        if concept not in self.concepts:
            raise KeyError(f"no concept {concept!r}; the concepts are {self.concepts}")
        return self.values[self.layers.index(layer)][self.concepts.index(concept)]

    def as_dict(self) -> dict[int, dict[str, float]]:
        return {
            layer: dict(zip(self.concepts, row, strict=True))
            for layer, row in zip(self.layers, self.values, strict=True)
        }


@dataclass
class TokenEvent:
    """One token of a Generate stream: a decoded token, or a scored prefill position."""

    position: int
    """Absolute session position of this token."""
    token_id: int
    is_prefill: bool
    """True for an appended (prompt) token, False for a decoded one."""
    logprob: float
    """log P(token | tokens before it) under the raw distribution; 0.0 at position 0."""
    rank: int
    """1 for the most likely token; 0 when not computed (position 0)."""
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """(token_id, logprob) of the most likely tokens, most likely first."""
    text: str = ""
    """Text this decoded token completes (with return_text); never splits a character."""
    readout: ReadoutValues | None = None
    """This position's readout, inside readout ranges; None elsewhere."""

    @classmethod
    def from_pb(cls, token: pb.Token, manifest: ReadoutManifest | None = None) -> TokenEvent:
        """Converts a ``salience.v1.Token``; ``manifest`` shapes its readout."""
        readout = None
        if token.readout and manifest is not None:
            width = len(manifest.concepts)
            flat = list(token.readout)
            readout = ReadoutValues(
                manifest.layers,
                manifest.concepts,
                [flat[i : i + width] for i in range(0, len(flat), width)],
            )
        return cls(
            position=token.position,
            token_id=token.id,
            is_prefill=token.is_prefill,
            logprob=token.sampled_logprob,
            rank=token.rank,
            top_logprobs=[(t.token_id, t.logprob) for t in token.top_logprobs],
            text=token.text,
            readout=readout,
        )


@dataclass
class Done:
    """The last event of a Generate stream."""

    prompt_tokens: int
    """The length the decode conditioned on: offset + appended tokens."""
    completion_tokens: int
    total_tokens: int
    """The session's new length."""
    finish_reason: str
    """``stop``, ``stop_string``, ``length``, ``context`` or ``prefill``."""
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    drafted_tokens: int = 0
    """Speculative drafts verified (``--speculative``)."""
    accepted_tokens: int = 0
    """Of those, the ones accepted."""
    stop_string: str = ""
    """The stop string that ended the call (``stop_string``); else empty."""

    @classmethod
    def from_pb(cls, done: pb.Done) -> Done:
        """Converts a ``salience.v1.Done``."""
        return cls(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.total_tokens,
            finish_reason=_enum_name(pb.FinishReason, done.finish_reason, "FINISH_REASON_"),
            cached_tokens=done.cached_tokens,
            recomputed_tokens=done.recomputed_tokens,
            queue_ms=done.queue_ms,
            prefill_ms=done.prefill_ms,
            decode_ms=done.decode_ms,
            drafted_tokens=done.drafted_tokens,
            accepted_tokens=done.accepted_tokens,
            stop_string=done.stop_string,
        )


@dataclass
class Embeddings:
    """The vectors of an ``embed`` call, one per input, in input order."""

    vectors: list[list[float]]
    num_tokens: list[int]
    """Tokens of each input."""
    prompt_tokens: int
    """Tokens of all inputs together."""

    @classmethod
    def from_pb(cls, response: pb.EmbedResponse) -> Embeddings:
        return cls(
            vectors=[list(e.values) for e in response.embeddings],
            num_tokens=[e.num_tokens for e in response.embeddings],
            prompt_tokens=response.prompt_tokens,
        )


@dataclass
class SessionInfo:
    """What the server knows about one session."""

    session_id: str
    length: int
    max_context: int
    residency: str
    """``resident``, ``offloaded`` or ``dropped``."""
    num_blocks: int
    kv_bytes: int
    idle_seconds: float
    is_busy: bool

    @classmethod
    def from_pb(cls, info: pb.SessionInfo) -> SessionInfo:
        """Converts a ``salience.v1.SessionInfo``."""
        return cls(
            session_id=info.session_id,
            length=info.length,
            max_context=info.max_context,
            residency=_enum_name(pb.Residency, info.residency, "RESIDENCY_"),
            num_blocks=info.num_blocks,
            kv_bytes=info.kv_bytes,
            idle_seconds=info.idle_seconds,
            is_busy=info.busy,
        )


@dataclass
class ModelInfo:
    """The served model: ids, limits, special tokens and capabilities."""

    model_id: str
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    chat_template: str
    bos_token_id: int | None
    image_pad_token_id: int | None
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    supports_images: bool
    supports_readout: bool
    readout_concepts: list[str]
    readout_layers: list[int]
    dtype: str
    device: str

    @classmethod
    def from_pb(cls, info: pb.GetModelInfoResponse) -> ModelInfo:
        """Converts a ``salience.v1.GetModelInfoResponse``."""

        def optional(name: str) -> int | None:
            return getattr(info, name) if info.HasField(name) else None

        return cls(
            model_id=info.model_id,
            vocab_size=info.vocab_size,
            max_context=info.max_context,
            eos_token_ids=list(info.eos_token_ids),
            chat_template=info.chat_template,
            bos_token_id=optional("bos_token_id"),
            image_pad_token_id=optional("image_pad_token_id"),
            vision_start_token_id=optional("vision_start_token_id"),
            vision_end_token_id=optional("vision_end_token_id"),
            supports_images=info.supports_images,
            supports_readout=info.supports_readout,
            readout_concepts=list(info.readout_manifest.concepts),
            readout_layers=list(info.readout_manifest.layers),
            dtype=info.dtype,
            device=info.device,
        )


class SalienceClientError(Exception):
    """A failed call: the gRPC status code, the server's reason and its message.

    ``reason`` is the google.rpc.ErrorInfo reason (``OFFSET_MISMATCH``,
    ``SESSION_NOT_FOUND``, ``SESSION_BUSY``, ...), or the status code's name when the
    server sent none (an unreachable server gives ``UNAVAILABLE``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
        session_length: int | None = None,
    ) -> None:
        super().__init__(f"{code.name} ({reason}): {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}
        """The ErrorInfo metadata."""
        self.session_length = session_length
        """For OFFSET_MISMATCH: the server's length of the session."""

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SalienceClientError:
        """Reads code, message, ErrorInfo and trailing metadata from a failed call
        (a sync ``grpc.RpcError`` or a ``grpc.aio.AioRpcError``)."""
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        message: str = error.details() or ""  # type: ignore[attr-defined]
        reason, metadata = code.name, {}
        try:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
        except ValueError:  # code or message disagree with the rich status: ignore it
            status = None
        for detail in status.details if status is not None else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
        trailing = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
        length = trailing.get(SESSION_LENGTH_METADATA, metadata.get("session_length"))
        session_length = int(length) if isinstance(length, str) and length.isdigit() else None
        if reason == code.name and code == grpc.StatusCode.UNAVAILABLE and "status: 503" in message:
            message += " (a proxy answers 503 when no replica behind it is in service)"
        return cls(code, reason, message, metadata, session_length)

    def noted(self, note: str) -> SalienceClientError:
        """This error, its message followed by ``note`` in parentheses (what the client
        knows of it that the server did not say)."""
        message = f"{self.message} ({note})"
        return SalienceClientError(
            self.code, self.reason, message, self.metadata, self.session_length
        )
