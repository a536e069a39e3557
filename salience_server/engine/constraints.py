"""Grammar-constrained decoding (SPEC 2.1 ``constraint``), with llguidance.

Why llguidance: it computes a token mask in tens of microseconds with no per-grammar
compilation to wait for (its lexer and parser are built lazily), it takes JSON Schema,
regular expressions and Lark/GBNF grammars, and it is a 3 MB wheel with no further
dependencies. vLLM and llama.cpp use it; xgrammar, the other common choice, pulls in a
1 GB triton build even on a CPU machine.

``ConstraintCompiler.compile`` validates a constraint against the model's tokenizer
(cached per constraint; called off the engine thread). Each constrained request gets a
fresh ``Matcher``: before a draw it gives the row's allowed tokens as a bitmask, after
it consumes the token drawn, and it says when the grammar is complete.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from salience_server.engine.errors import invalid

if TYPE_CHECKING:  # only in the type stubs
    from llguidance._lib import JsonCompileOptions

_CACHE_SIZE = 256
JSON_OBJECT_SCHEMA = '{"type": "object"}'
JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""JSON as ``json.dumps`` writes it. Free whitespace lets a model pad its output with
spaces and newlines until max_tokens; a schema may still choose otherwise through its
``x-guidance`` options."""


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint as the request gives it: its kind and its text."""

    kind: str
    """json_schema, json_object, regex, ebnf or lark."""
    text: str


@dataclass(frozen=True)
class CompiledConstraint:
    """A grammar validated against the served tokenizer, ready for matchers."""

    spec: ConstraintSpec
    grammar: str
    """llguidance's grammar (JSON)."""


class ConstraintCompiler:
    """Validates constraints; thread-safe (called from worker threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self.compile = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compile)

    @property
    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer: built once (about a second), on first use."""
        with self._lock:
            if self._tokenizer is None:
                # Every token the tokenizer knows, also where the model's vocabulary is
                # smaller (llguidance refuses that); the masks are cut to the logits.
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer,
                    n_vocab=max(self._vocab_size, len(self._hf_tokenizer)),
                    eos_token=self._eos_token_ids[0] if self._eos_token_ids else None,
                )
            return self._tokenizer

    def _compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """INVALID_ARGUMENT (INVALID_CONSTRAINT) naming the problem when it does not
        compile."""
        try:
            grammar = _grammar(spec)
        except Exception as error:
            raise _invalid(spec, str(error)) from error
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer
        )
        if is_error:
            raise _invalid(spec, "; ".join(messages) or "the grammar does not compile")
        compiled = CompiledConstraint(spec, grammar)
        try:  # the lexer is built on the first mask: past llguidance's limits, it fails
            self.matcher(compiled).bitmask()
        except ConstraintFailed as error:
            raise _invalid(spec, str(error)) from None
        return compiled

    def matcher(self, compiled: CompiledConstraint) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.tokenizer, compiled.grammar), self._vocab_size)


MAX_ERROR_CHARS = 300
"""Of the grammar engine's error in a message (it may quote the whole grammar)."""


class ConstraintFailed(RuntimeError):
    """The grammar engine failed while decoding (a lexer past its limits, met lazily
    in a state compiling did not reach): the request's fault, not the server's."""

    def __init__(self, what: str) -> None:
        super().__init__(_shortened(what))


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._failure: ConstraintFailed | None = None
        """Why the tokens ``catch_up`` read broke the grammar, raised at the first mask."""

    def catch_up(self, token_ids: list[int]) -> None:
        """Reads the tokens a resumed stream's broken call decoded, so that the grammar
        goes on where that call was (it started again: a JSON object resumed midway
        began a second one). Tokens that break it fail the call at its first step."""
        self._failure = _caught_up(self, token_ids)

    def bitmask(self) -> torch.Tensor:
        """[ceil(V / 32)] int32 words on the host (sent with the step's inputs): bit
        ``t % 32`` of word ``t // 32`` is set when token ``t`` may come next."""
        if self._failure is not None:
            raise self._failure
        data = self._matcher.compute_bitmask()
        if self._matcher.is_error():
            raise ConstraintFailed(f"the grammar matcher failed: {self._matcher.get_error()}")
        if not _allows_any_below(data, self._vocab_size):
            # Only tokens the tokenizer has past the model's vocabulary (added ones, whose
            # text llguidance spells with them alone): the model cannot go on.
            raise ConstraintFailed("the grammar allows no token of the model's vocabulary next")
        return torch.frombuffer(bytearray(data), dtype=torch.int32)

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise ConstraintFailed(
                f"token {token_id} breaks the grammar: {self._matcher.get_error() or 'rejected'}"
            )

    @property
    def is_complete(self) -> bool:
        """The grammar admits nothing more: decoding ends here."""
        return self._failure is None and bool(self._matcher.is_stopped())


class ThinkingMatcher:
    """A matcher leaving a reasoning model's thinking free (``GenerateParams.thinking``):
    the grammar applies once the end token has been decoded. With a start token, the
    reply's first token may be it (the thinking opens) or one the grammar allows."""

    def __init__(self, inner: Matcher, start: int | None, end: int) -> None:
        self._inner = inner
        self._start = start
        self._end = end
        self._state: Literal["start", "thinking", "answer"] = (
            "thinking" if start is None else "start"
        )
        self._failure: ConstraintFailed | None = None

    def catch_up(self, token_ids: list[int]) -> None:
        """As ``Matcher.catch_up``."""
        self._failure = _caught_up(self, token_ids)

    def bitmask(self) -> torch.Tensor | None:
        """The grammar's mask, the start token allowed too at the reply's start; None
        (no mask) while thinking."""
        if self._failure is not None:
            raise self._failure
        if self._state == "thinking":
            return None
        mask = self._inner.bitmask()
        if self._state == "start" and self._start is not None:
            word, bit = divmod(self._start, 32)
            if word < mask.shape[0]:
                value = int(mask[word]) | (1 << bit)
                mask[word] = value - (1 << 32) if value >= 1 << 31 else value
        return mask

    def consume(self, token_id: int) -> None:
        if self._state == "start" and token_id == self._start:
            self._state = "thinking"
        elif self._state == "thinking":
            if token_id == self._end:
                self._state = "answer"
        else:
            self._state = "answer"
            self._inner.consume(token_id)

    @property
    def is_complete(self) -> bool:
        return self._failure is None and self._state == "answer" and self._inner.is_complete


def _caught_up(matcher: Matcher | ThinkingMatcher, token_ids: list[int]) -> ConstraintFailed | None:
    """Feeds ``matcher`` a resumed stream's earlier tokens; why they break it, if they do."""
    for token_id in token_ids:
        try:
            matcher.consume(token_id)
        except ConstraintFailed as error:
            return ConstraintFailed(f"a token decoded before decode_start's resume: {error}")
    return None


def allows_any_but(mask: torch.Tensor, excluded: Collection[int], vocab_size: int) -> bool:
    """Whether a bitmask (``Matcher.bitmask``) allows a token below ``vocab_size`` other
    than those ``excluded`` (bit ``t % 8`` of byte ``t // 8``: the words are
    little-endian)."""
    data = bytearray(mask.numpy().tobytes())
    for token_id in excluded:
        if token_id // 8 < len(data):
            data[token_id // 8] &= 0xFF ^ (1 << token_id % 8)
    return _allows_any_below(bytes(data), vocab_size)


def _allows_any_below(data: bytes, vocab_size: int) -> bool:
    """Whether a bitmask (little-endian 32-bit words, as llguidance gives it) allows a
    token id below ``vocab_size``. Read from the bytes: no tensor, nothing to sync."""
    whole, rest = divmod(vocab_size, 32)
    if data[: 4 * whole].count(0) < min(4 * whole, len(data)):
        return True
    word = data[4 * whole : 4 * whole + 4]
    return rest > 0 and len(word) == 4 and bool(int.from_bytes(word, "little") & ((1 << rest) - 1))


def apply_bitmasks(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """[D, V] logits, [C] rows, [C * W] int32 words (``Matcher.bitmask`` of each row, one
    after the other) -> the logits with the tokens each row's bitmask forbids at -inf, in
    place (the caller's logits are its own copy: ``penalties.apply``); the other rows
    unchanged. Returns ``logits``."""
    words = words.view(rows.shape[0], -1)  # [C, W]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).flatten(1).bool()  # [C, 32 * W]
    vocab_size = logits.shape[1]
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab_size], -torch.inf)
    return logits


def _grammar(spec: ConstraintSpec) -> str:
    if spec.kind in ("json_schema", "json_object"):
        schema = spec.text if spec.kind == "json_schema" else JSON_OBJECT_SCHEMA
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
    if spec.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(spec.text))
    if spec.kind == "ebnf":
        return str(llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec.text)))
    if spec.kind == "lark":
        return str(llguidance.LLMatcher.grammar_from_lark(spec.text))
    raise ValueError(f"unknown constraint kind {spec.kind!r}")


def _invalid(spec: ConstraintSpec, why: str) -> Exception:
    why = _shortened(why)
    return invalid("INVALID_CONSTRAINT", f"the {spec.kind} constraint does not compile: {why}")


def _shortened(what: str) -> str:
    """The grammar engine's message on one line, cut to ``MAX_ERROR_CHARS``: it may quote
    the whole grammar (9 KB for a 3,000-character regex), and it quotes the lines around
    a compile error with a caret under the place, which its ``line(column)`` names."""
    lines = (line.strip() for line in what.splitlines())
    what = " ".join(line for line in lines if line and not _QUOTED_LINE.match(line))
    return what if len(what) <= MAX_ERROR_CHARS else what[:MAX_ERROR_CHARS] + "..."


_QUOTED_LINE = re.compile(r"\d+ \| |\^+$")
"""A line of the grammar quoted under a compile error (``  2 | foo: bar``), or the caret
under it."""
