"""``DecodeOptions``: how an OpenAI request asks to decode, in the server's terms, and
the keyword options of each Generate call of a ``Generation`` that follow from them."""

from __future__ import annotations

from dataclasses import dataclass

from salience_client import END, GenerateOptions
from salience_server.http.constraints import Constraint


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode, in the server's terms (proto3 zeros mean "unset")."""

    max_tokens: int
    """0: prefill only."""
    temperature: float = 1.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, value added to its logit)."""
    seed: int | None = None
    """Choice ``i`` uses ``seed + i`` so that n > 1 choices differ."""
    stop_strings: tuple[str, ...] = ()
    include_stop_string: bool = False
    """vLLM's ``include_stop_str_in_output``: the text keeps the stop string matched (or
    the stop token's text)."""
    keep_special_tokens: bool = False
    """vLLM's ``skip_special_tokens: false``: special tokens' text is in the reply."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    """Lower runs first (vLLM's sense)."""
    constraint: Constraint | None = None
    """The language the decoded text must be in (structured output, forced tool calls)."""
    thinking: tuple[int | None, int] | None = None
    """A reasoning model's thinking tokens, which the constraint leaves free: (the one
    the reply may open with, None when the prompt opened the thinking; the one ending
    it). None: the constraint applies from the first token."""
    logprob_top_k: int = 0
    """Most likely alternatives returned with each decoded token."""
    score_prompt: bool = False
    """Also return the logprob of every prompt position (the session is not reused)."""

    def generate_options(
        self,
        index: int,
        decode_start: int,
        is_prompt_call: bool,
        max_tokens: int,
        score_from: int = 0,
    ) -> GenerateOptions:
        """The keyword options of ``AsyncSession.generate`` for choice ``index``;
        ``is_prompt_call``: this call appends the prompt (and may score it, from position
        ``score_from``: the scores of those before are kept). What shapes decoding goes
        only with calls that decode (``max_tokens > 0``)."""
        options = GenerateOptions(
            max_tokens=max_tokens,
            return_text=True,
            priority=self.priority,
        )
        if max_tokens > 0:
            options.update(self._decoding(index))
        ranges = []
        if self.score_prompt and is_prompt_call:
            ranges.append((score_from, END))
        elif self.logprob_top_k:
            ranges.append((decode_start, END))
        if ranges:
            options["logprobs_ranges"] = ranges
            options["logprob_top_k"] = self.logprob_top_k
        return options

    def _decoding(self, index: int) -> GenerateOptions:
        """The options that shape decoding, for choice ``index``."""
        options = GenerateOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=dict(self.logit_bias),
            stop_strings=list(self.stop_strings),
            include_stop_string=self.include_stop_string,
            keep_special_tokens=self.keep_special_tokens,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )
        if self.constraint is not None:
            kind, value = self.constraint
            constraint: dict[str, str | bool | int] = {kind: value}
            if self.thinking is not None:
                start, end = self.thinking
                constraint["thinking_end_token"] = end
                if start is not None:
                    constraint["thinking_start_token"] = start
            options["constraint"] = constraint
        if self.seed is not None:
            options["seed"] = (self.seed + index) % 2**64
        return options
