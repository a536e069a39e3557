"""Errors the engine raises for bad requests; the servicer maps them to gRPC statuses."""

from __future__ import annotations

import enum

import torch


class Code(enum.Enum):
    """The status a failure maps to (names follow grpc.StatusCode)."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    ABORTED = "ABORTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class SalienceError(Exception):
    """A failure with a status code, a machine-readable reason and a human message."""

    def __init__(
        self, code: Code, reason: str, message: str, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}


def invalid(reason: str, message: str) -> SalienceError:
    return SalienceError(Code.INVALID_ARGUMENT, reason, message)


def shown_id(session_id: str) -> str:
    """The id as a message quotes it: a long one is cut, as the whole message travels in
    the status's metadata, whose size gRPC bounds (8 KiB by default)."""
    if len(session_id) <= 80:
        return repr(session_id)
    return f"{session_id[:64]!r}... ({len(session_id)} characters)"


def session_not_found(session_id: str) -> SalienceError:
    return SalienceError(
        Code.NOT_FOUND,
        "SESSION_NOT_FOUND",
        f"no session {shown_id(session_id)} (unknown, closed or expired)",
    )


def shutting_down() -> SalienceError:
    return SalienceError(Code.UNAVAILABLE, "SHUTTING_DOWN", "the server is stopping")


def images_unsupported() -> SalienceError:
    return SalienceError(
        Code.FAILED_PRECONDITION, "IMAGES_UNSUPPORTED", "the served model does not take images"
    )


def session_busy(session_id: str) -> SalienceError:
    return SalienceError(
        Code.FAILED_PRECONDITION,
        "SESSION_BUSY",
        f"session {shown_id(session_id)} is running another call",
    )


def session_closed() -> SalienceError:
    return SalienceError(Code.CANCELLED, "SESSION_CLOSED", "the session was closed during the call")


def device_lost(error: BaseException) -> bool:
    """A CUDA error (an illegal memory access, a device-side assert) leaves the device's
    context unusable: every later step fails too, so the engine stops rather than fail
    each call with it while it looks healthy. Out of memory is not one of them."""
    fatal = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    return (fatal is not None and isinstance(error, fatal)) or str(error).startswith("CUDA error")


def out_of_memory(error: BaseException) -> bool:
    """The device (or, on CPU, the host) could not allocate what a step needed: the step's
    activations and logits come from memory the KV pool leaves free."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def release_cached_memory() -> None:
    """Hands the CUDA caching allocator's free blocks back, so that a step that ran out
    of memory can run again in one piece rather than in the fragments they left."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
