"""What a reply reports about its tokens beside their text: OpenAI's ``finish_reason``,
vLLM's ``stop_reason``, and the prompt's token ids as the model read them."""

from __future__ import annotations

from salience_client import Done


def model_token_ids(prompt_ids: list[int], image_pad_token_id: int | None) -> list[int]:
    """A prompt's token ids as the model read them (vLLM's ``prompt_token_ids``): an
    image's markers as the image pad token its placeholders are."""
    pad = image_pad_token_id if image_pad_token_id is not None else 0
    return [token_id if token_id >= 0 else pad for token_id in prompt_ids]


def finish_reason(done: Done) -> str:
    """OpenAI's ``finish_reason`` for the server's: a stop token or string is ``stop``;
    max_tokens, the context limit or a prefill-only call is ``length``."""
    return "stop" if done.finish_reason in ("stop", "stop_string") else "length"


def stop_reason(
    done: Done,
    decoded_ids: list[int],
    stops: str | list[str] | None,
    stop_token_ids: list[int],
    eos_token_ids: list[int],
) -> str | int | None:
    """vLLM's ``stop_reason``: the stop string (of ``stops``, the request's own) or the
    ``stop_token_ids`` token that ended the choice; None for an end-of-sequence token
    (listed in ``stop_token_ids`` too, as vLLM), a limit, or a stop string the shim
    added."""
    requested = [stops] if isinstance(stops, str) else list(stops or [])
    if done.finish_reason == "stop_string" and done.stop_string in requested:
        return done.stop_string
    last = decoded_ids[-1] if decoded_ids else None
    if done.finish_reason == "stop" and last in stop_token_ids and last not in eos_token_ids:
        return last
    return None


def client_stopped(
    done: Done, stops: str | list[str] | None, stop_reason: str | int | None
) -> bool:
    """Whether a stop of the client's own ended the choice: its ``stop_reason`` (a stop
    string or ``stop_token_ids`` token it gave), or a stop string where it gave some
    (one whose ``Done.stop_string`` the server left unnamed)."""
    return stop_reason is not None or (done.finish_reason == "stop_string" and bool(stops))
