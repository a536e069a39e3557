"""Request bodies of the three OpenAI endpoints, validated by pydantic.

Unknown fields are accepted and ignored (SDKs send fields this server has no use for),
except vLLM's structured-output fields, read from the extra fields; fields whose
non-default values this server cannot honour are refused in ``check``.
Responses are built as plain dicts where they are made, to keep their shape visible.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from salience_server.http.constraints import (
    Constraint,
    Sourced,
    guided_constraint,
    one_constraint,
    response_format_constraint,
)
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.errors import invalid, unsupported
from salience_server.http.refused_fields import UNOFFERED_SAMPLING, refuse_unoffered

MAX_TOKEN_ID = 2**32 - 1
MAX_FLOAT = 3.4028234663852886e38
"""The largest float the protocol's float fields hold (float32's); beyond it a value
would reach the server as infinity."""
Each = Field(fail_fast=True)
"""A list in a union of lists checked up to its first bad item: a prompt of 30 million
token ids took 16 s to refuse as a list of strings, one error an id."""
MAX_BATCH_CHOICES = 2048
"""The most choices one Completions request may ask for (its prompts times ``n``), as
many as the server embeds in one call. Unbounded, a 120 KB body of 20,000 one-letter
prompts tokenized each prompt, then started every generation at once: 90 s later a
504, and meanwhile the shim answered even ``/health`` 15 s late."""
_MIN_TOP_P = 1e-6
"""What an explicit ``top_p: 0`` becomes: only the most likely token (the server reads 0
as "unset", which is 1)."""


class Body(BaseModel):
    """A request body: unknown fields are kept (``model_extra``), never refused. Numbers
    are finite (Python's JSON reader takes ``Infinity`` and ``NaN``). A field sent as
    null takes its default, as in OpenAI's API, where every optional field is nullable
    (clients built from its OpenAPI spec send ``"n": null``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class SamplingFields(Body):
    """Sampling fields shared by every endpoint; None means the default. Besides
    OpenAI's, vLLM's extra fields: ``top_k``, ``min_p``, ``repetition_penalty``,
    ``ignore_eos``, ``stop_token_ids``, ``min_tokens``, ``priority``."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID)
    """-1 or 0: no top-k (vLLM's extension)."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_FLOAT)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """A 64-bit integer, as OpenAI's and vLLM's; -1 is no seed, as in vLLM."""
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI's API sends it) -> value in [-100, 100]."""
    user: str | None = None
    ignore_eos: bool = False
    """Decode past the model's end-of-sequence tokens (``stop_token_ids`` still stop)."""
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_TOKEN_ID)
    """End-of-sequence and ``stop_token_ids`` cannot end the reply before this many tokens."""
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    """Lower runs first; equal priorities in arrival order."""
    include_stop_str_in_output: bool = False
    """vLLM's: the reply's text keeps the stop string that ended it."""
    skip_special_tokens: bool = True
    """vLLM's: false writes special tokens' text in the reply. Unset, it is false where
    the reply is read for tool calls (``decode_options``' ``reads_markers``) and the
    stop's text is not asked for."""

    def decode_options(
        self,
        max_tokens: int,
        stop: str | list[str] | None = None,
        logprob_top_k: int = 0,
        score_prompt: bool = False,
        constraint: Constraint | None = None,
        extra_stops: tuple[str, ...] = (),
        reads_markers: bool = False,
    ) -> DecodeOptions:
        """The server-side decoding options these fields ask for (OpenAI's default
        temperature is 1). ``reads_markers``: the reply is parsed for markers that are
        special tokens in some models (Mistral's ``[TOOL_CALLS]``, Llama's
        ``<|python_tag|>``, DeepSeek's, some models' ``<tool_call>``): unless the client
        chose, their text is kept, or a call after text would stay text (vLLM keeps them
        likewise for its tool parsers)."""
        skips_special = (
            self.skip_special_tokens
            if "skip_special_tokens" in self.model_fields_set
            # include_stop_str_in_output would then write the end-of-turn token's text.
            else not reads_markers or self.include_stop_str_in_output
        )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return DecodeOptions(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=_MIN_TOP_P if self.top_p == 0 else self.top_p or 0.0,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            seed=None if self.seed == -1 else self.seed,  # vLLM's -1: no seed
            stop_strings=tuple(dict.fromkeys(s for s in [*stops, *extra_stops] if s)),
            include_stop_string=self.include_stop_str_in_output,
            keep_special_tokens=not skips_special,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            priority=self.priority,
            constraint=constraint,
            logprob_top_k=logprob_top_k,
            score_prompt=score_prompt,
        )

    def check_sampling(self, vocab_size: int, max_tokens: int | None) -> None:
        """What the field types alone cannot check: ``logit_bias`` keys are token ids of
        the vocabulary and its values lie in [-100, 100] (OpenAI's rules);
        ``min_tokens`` is at most ``max_tokens`` (vLLM's)."""
        for key, value in (self.logit_bias or {}).items():
            # ASCII digits only: str.isdigit takes "²" (which int() refuses) and "٨".
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
                raise invalid(
                    f"Invalid key in 'logit_bias': {key!r}. Keys must be token ids "
                    f"(non-negative integers below the vocabulary size, {vocab_size}).",
                    "logit_bias",
                )
            if not -100.0 <= value <= 100.0:
                raise invalid(
                    f"Invalid value in 'logit_bias' for {key}: {value}. Values must be "
                    "between -100 and 100.",
                    "logit_bias",
                )
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise invalid(
                f"min_tokens ({self.min_tokens}) must be at most the maximum number of "
                f"tokens ({max_tokens})",
                "min_tokens",
            )
        extra = self.model_extra or {}
        for name, what in UNOFFERED_SAMPLING.items():
            if extra.get(name):  # None, false and empty lists ask for nothing
                raise unsupported(what, name)

    def guided(self) -> tuple[str, Constraint | None]:
        """vLLM's structured-output extra fields (``guided_*``, ``structured_outputs``),
        with the field that gave one."""
        return guided_constraint(self.model_extra or {}) or ("structured_outputs", None)


class StreamOptions(Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool = False


class ReplyFields(SamplingFields):
    """What Chat Completions and Completions share beyond sampling: the stream, ``n``,
    stop strings, structured output, and vLLM's fields for reading tokens back."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    """``json_object`` or ``json_schema`` (vLLM's in Completions too)."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: logprobs write each token as ``token_id:N``."""
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    """vLLM's: each prompt token's logprob, rank and this many alternatives."""
    return_token_ids: bool = False
    """vLLM's: each choice carries its decoded ``token_ids``, and the reply its
    ``prompt_token_ids`` (per choice in completions)."""
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    """vLLM's: only the prompt's last k tokens are sent (-1: the model's context)."""

    def check_stream(self) -> None:
        """Refuses what needs a stream, or cannot have one (400)."""
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise invalid("prompt_logprobs is not available when stream is true", "prompt_logprobs")

    def constraint(self) -> Sourced | None:
        """The structured output asked for (``response_format`` or vLLM's fields)."""
        return one_constraint(
            ("response_format", response_format_constraint(self.response_format)),
            self.guided(),
        )


class ChatCompletionRequest(ReplyFields):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables of the chat template (vLLM's; Qwen3's ``enable_thinking``)."""
    add_generation_prompt: bool | None = None
    """End the prompt with the assistant turn's opening (vLLM's; default True, False
    when ``continue_final_message``)."""
    continue_final_message: bool = False
    """The last message is an assistant message to continue, left open (vLLM's)."""
    echo: bool = False
    """Each choice's content opens with the last message's text where the reply goes on
    in its role (vLLM's: the assistant's, the last message's without a generation prompt)."""

    @property
    def max_reply_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens`` (None: the context left)."""
        return self.max_completion_tokens or self.max_tokens

    def check(self, vocab_size: int) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling(vocab_size, self.max_reply_tokens)
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        self.check_stream()
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].get("role") != "assistant":
            raise invalid(
                "continue_final_message needs an assistant message last", "continue_final_message"
            )
        refuse_unoffered(self.model_extra or {})


class CompletionRequest(ReplyFields):
    """POST /v1/completions (the legacy text completion API)."""

    prompt: (
        str
        | Annotated[list[str], Each]
        | Annotated[list[int], Each]
        | Annotated[list[list[int]], Each]
    )
    max_tokens: int = Field(16, ge=0)
    """0: score the prompt only (with ``echo`` and ``logprobs``)."""
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

    def check(self, vocab_size: int) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling(vocab_size, self.max_tokens)
        if self.suffix:
            raise unsupported("suffix", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of other than n", "best_of")
        self.check_stream()
        if isinstance(self.prompt, list) and not self.prompt:
            raise invalid("prompt must not be empty", "prompt")
        batch = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else None
        num_prompts = batch or len(self.prompt)
        if num_prompts * self.n > MAX_BATCH_CHOICES:
            raise invalid(
                f"{num_prompts} prompts times n={self.n} make {num_prompts * self.n} choices; "
                f"at most {MAX_BATCH_CHOICES} per request",
                "prompt",
            )
