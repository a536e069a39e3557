"""The requests that re-create a lost session from its ``History`` (SPEC 2.7): a
prefill-only Generate per run of text, an AppendImage per image, each rewriting the copy
from its offset (``truncating``: whatever a stale copy held there goes)."""

from __future__ import annotations

import grpc

from salience_client.history import History, ImageStep, PrefillStep, ReplayStep
from salience_client.pb import salience_pb2 as pb
from salience_client.types import SalienceClientError


def steps(history: History, length: int, is_fresh: bool) -> list[ReplayStep]:
    """The calls that rebuild the first ``length`` positions of ``history``; on a stale
    copy (``is_fresh`` False: the id was taken) they start by rewinding it to position 0."""
    replay_steps = history.replay_steps(length)
    if not is_fresh and not replay_steps:
        replay_steps = [PrefillStep(0, [])]
    return replay_steps


def prefill_request(session_id: str, step: PrefillStep, priority: int) -> pb.GenerateRequest:
    """The Generate call that puts ``step``'s tokens back, decoding nothing, at the
    ``priority`` of the call that needs the session."""
    return pb.GenerateRequest(
        session_id=session_id,
        append_tokens=step.token_ids,
        offset=step.offset,
        truncating=True,
        max_tokens=0,
        priority=priority,
    )


def image_request(session_id: str, step: ImageStep, priority: int) -> pb.AppendImageRequest:
    """The AppendImage call that puts ``step``'s image back, at the ``priority`` of the
    call that needs the session."""
    return pb.AppendImageRequest(
        session_id=session_id,
        image=step.image.data,
        mime_type=step.image.mime_type,
        offset=step.offset,
        truncating=True,
        priority=priority,
    )


def check_replayed_image(
    session_id: str, replica: str | None, step: ImageStep, placeholder_count: int
) -> None:
    """REPLAY_MISMATCH when the image put back became another number of placeholders
    than it did before (the replicas serve different models)."""
    if placeholder_count != step.image.num_tokens:
        raise SalienceClientError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "REPLAY_MISMATCH",
            f"the image at position {step.offset} of session {session_id!r} became "
            f"{placeholder_count} placeholders on replica {replica}, "
            f"{step.image.num_tokens} before: the replicas serve different models",
        )
