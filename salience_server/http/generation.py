"""``Generation``: one prompt decoded into ``n`` choices on pooled server sessions.

With ``n == 1`` the prompt's new tokens are appended and decoded in one Generate call.
With ``n > 1`` the prompt is prefilled once, the session is forked ``n - 1`` times
(copy-on-write KV) and the choices decode concurrently. Events come out as they arrive:
``PromptToken`` (scored prompt positions, when asked for), then ``ChoiceToken`` and one
``ChoiceDone`` per choice. Closing the iterator early cancels every gRPC call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from salience_client import Done, SalienceClientError, TokenEvent
from salience_server.http.decode_options import DecodeOptions
from salience_server.http.messages import ImageInput
from salience_server.http.pooled_session import Scores
from salience_server.http.sessions_pool import Lease, SessionPool


@dataclass
class PromptToken:
    """A scored prompt position (only with ``score_prompt``)."""

    token: TokenEvent


@dataclass
class ChoiceToken:
    """A decoded token of choice ``index``; ``token.text`` is its text (may be empty)."""

    index: int
    token: TokenEvent


@dataclass
class ChoiceDone:
    """Choice ``index`` finished."""

    index: int
    done: Done
    token_ids: list[int] = field(default_factory=list)
    """Every token the choice decoded (the stop token included)."""


GenerationEvent = PromptToken | ChoiceToken | ChoiceDone


class Generation:
    """Decodes ``prompt_ids`` into ``n`` choices; iterate ``events()`` once."""

    def __init__(
        self,
        pool: SessionPool,
        prompt_ids: list[int],
        options: DecodeOptions,
        n: int = 1,
        images: dict[int, ImageInput] | None = None,
        image_token_counts: dict[int, int] | None = None,
        prompt_tail: int = 0,
    ) -> None:
        self._pool = pool
        self.prompt_tail = prompt_tail
        """The prompt's last tokens that open the reply (``SessionPool.acquire``)."""
        self.prompt_ids = prompt_ids
        """The prompt; negative ids are image markers (see Backend.mark_images). Once the
        images are in the session, each image's run of markers has its true length:
        this list is updated in place, so the caller's view follows."""
        self.images = images or {}
        self.image_token_counts = image_token_counts if image_token_counts is not None else {}
        self.options = options
        self.n = n
        self.cached_tokens = 0
        """Prompt tokens whose KV the server already held (set once the prompt is in)."""
        self._reused: int | None = None
        """What the server held of the prompt before its images went in, once they did."""
        self.has_siblings = False
        """Generations sharing this one's prefix start with it (``SessionPool.acquire``)."""

    async def events(self) -> AsyncGenerator[GenerationEvent, None]:
        """Every event of every choice, in arrival order."""
        lease = await self._pool.acquire(
            self.prompt_ids,
            reuse=self.keeps_scores or not self.options.score_prompt,
            scoring=self.options.logprob_top_k if self.keeps_scores else None,
            has_siblings=self.has_siblings,
            prompt_tail=self.prompt_tail,
        )
        try:
            await self._put_images(lease)
        except SalienceClientError as error:
            if not is_lost(error):
                self._pool.discard(lease)
                raise
            lease = await self._fresh_lease(lease)
        except BaseException:
            self._pool.discard(lease)
            raise
        max_tokens = self.options.max_tokens if self.n == 1 else 0
        async with contextlib.aclosing(self._first_call(lease, max_tokens)) as first:
            async for event in first:
                if isinstance(event, Lease):
                    lease = event  # the prompt is in; the session stays lent to this request
                else:
                    yield event
        if self.n == 1:
            return
        leases = [lease]
        try:
            for _ in range(self.n - 1):
                leases.append(await self._pool.fork(lease, self.prompt_ids))
        except BaseException:
            for other in leases:
                self._pool.release(other, self.prompt_ids)
            raise
        async with contextlib.aclosing(self._merge(leases)) as merged:
            async for event in merged:
                yield event

    @property
    def keeps_scores(self) -> bool:
        """Whether this call's prompt scores are kept with its session, and it may be
        scored from where a pooled session's kept scores end (not with images: their
        positions carry none, and their runs change length as they go in)."""
        return self.options.score_prompt and all(token_id >= 0 for token_id in self.prompt_ids)

    async def _fresh_lease(self, lost: Lease) -> Lease:
        """A fresh session holding the prompt's images in place of ``lost``, which the
        server no longer knows (its TTL passed while it was pooled)."""
        self._pool.discard(lost)
        lease = await self._pool.acquire(self.prompt_ids, reuse=False)
        self._reused = None
        try:
            await self._put_images(lease)
        except BaseException:
            self._pool.discard(lease)
            raise
        return lease

    async def _put_images(self, lease: Lease) -> None:
        """Appends the prompt up to its last image to ``lease``'s session (none past what
        it holds: nothing to do): text with Generate (prefill only), each image with
        AppendImage, each at the request's priority; the rest of the prompt is left to
        the decoding call."""
        ids, session = self.prompt_ids, lease.session
        start = lease.shared
        if all(token_id >= 0 for token_id in ids[start:]):
            return
        while 0 < start < len(ids) and ids[start] < 0 and ids[start - 1] == ids[start]:
            start -= 1  # never resume inside an image's run
        done_ids, index, truncate_to = list(ids[:start]), start, start
        while True:
            image_at = next((i for i in range(index, len(ids)) if ids[i] < 0), None)
            if image_at is None:
                break
            text = ids[index:image_at]
            marker = ids[image_at]
            image = self.images[marker]
            # A refused image raises SalienceClientError: the endpoint names its field.
            async for event in session.generate(
                text, truncate_to=truncate_to, max_tokens=0, priority=self.options.priority
            ):
                if isinstance(event, Done) and self._reused is None:
                    self._reused = event.cached_tokens
            count = await self._append_image(lease, image)
            self.image_token_counts[marker] = count
            done_ids += text + [marker] * count
            index = image_at
            while index < len(ids) and ids[index] == marker:
                index += 1
            truncate_to = len(done_ids)
        ids[:] = done_ids + ids[index:]
        lease.entry.token_ids = list(done_ids)
        lease.shared = len(done_ids)

    async def _append_image(self, lease: Lease, image: ImageInput) -> int:
        """Appends ``image`` to the lease's session; where the server's host memory for
        image embeddings is full, the pool's idle sessions holding images are closed,
        least recently used first, until it fits (they held it for good: every new image
        was refused 429 until their TTL passed)."""
        while True:
            try:
                return await lease.session.append_image(
                    image.data, image.mime_type, priority=self.options.priority
                )
            except SalienceClientError as error:
                if error.reason != "HOST_MEMORY_FULL":
                    raise
                if not await self._pool.free_image_memory(lease.entry):
                    raise

    async def _first_call(
        self, lease: Lease, max_tokens: int
    ) -> AsyncGenerator[GenerationEvent | Lease, None]:
        """Puts the prompt in ``lease``'s session and decodes choice 0, retrying once on a
        fresh session if the server lost the pooled one. With ``max_tokens`` 0 (the
        prefill of n > 1 choices) it ends by yielding the lease, still lent, instead of a
        ChoiceDone."""
        retry = True
        is_prefill = self.n > 1
        while True:
            is_started = False
            try:
                calls = self._call(lease, 0, lease.shared, max_tokens, True, is_prefill)
                async with contextlib.aclosing(calls):
                    async for event in calls:
                        is_started = True
                        if isinstance(event, ChoiceDone):
                            self.cached_tokens = event.done.cached_tokens
                            if self._reused is not None:  # the rest was put in just now
                                self.cached_tokens = self._reused
                            if is_prefill:
                                if self.options.max_tokens > 0:
                                    # Each choice's call feeds the prompt's last token again
                                    # for its logits, as a lone call does (the prefill's
                                    # Done counted the whole prompt held as cached).
                                    last = len(self.prompt_ids) - 1
                                    self.cached_tokens = min(self.cached_tokens, last)
                                yield lease
                                return
                        yield event
                return
            except SalienceClientError as error:
                if not (retry and not is_started and is_lost(error)):
                    raise
                lease, retry = await self._fresh_lease(lease), False

    async def _call(
        self,
        lease: Lease,
        index: int,
        truncate_to: int,
        max_tokens: int,
        is_prompt_call: bool,
        keep_lease: bool = False,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """One Generate call on ``lease``: appends the prompt past ``truncate_to``, decodes;
        gives the session back to the pool however the call ends (unless ``keep_lease``
        and it finished)."""
        append = self.prompt_ids[truncate_to:]
        base_ids = lease.known_ids[:truncate_to] + append
        keeps = is_prompt_call and self.keeps_scores
        scored: list[TokenEvent] = []  # kept scores first, then this call's
        if keeps:
            scored = lease.entry.scores.up_to(truncate_to, self.options.logprob_top_k)
        options = self.options.generate_options(
            index, len(self.prompt_ids), is_prompt_call, max_tokens, len(scored)
        )
        kept, decoded = list(scored), list[int]()
        is_accepted = is_finished = False
        events = lease.session.generate(append, truncate_to=truncate_to, **options)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if not is_accepted:  # the server has applied the append
                        is_accepted = True
                        for token in kept:
                            yield PromptToken(token)
                    if isinstance(event, Done):
                        is_finished = True
                        held, scores = base_ids + decoded, self._scores(scored)
                        if keep_lease:
                            lease.entry.hold(held, scores)
                        else:
                            self._pool.release(lease, held, scores)
                        yield ChoiceDone(index, event, decoded)
                        continue
                    if keeps:
                        scored.append(event)
                    if event.is_prefill:
                        yield PromptToken(event)
                    else:
                        decoded.append(event.token_id)
                        yield ChoiceToken(index, event)
        finally:
            if not is_finished:
                known = base_ids + decoded if is_accepted else lease.known_ids[:truncate_to]
                self._pool.abandon(lease, known)

    def _scores(self, scored: list[TokenEvent]) -> Scores | None:
        """What a call that scored ``scored`` (every position from 0, in order) leaves
        kept with its session; None to keep what was (a call that scored nothing)."""
        if not scored or any(event.position != i for i, event in enumerate(scored)):
            return None
        return Scores(scored, self.options.logprob_top_k)

    async def _merge(self, leases: list[Lease]) -> AsyncGenerator[GenerationEvent, None]:
        """Decodes one choice per lease concurrently and interleaves their events."""
        queue: asyncio.Queue[GenerationEvent | BaseException | None] = asyncio.Queue()
        start = len(self.prompt_ids)

        async def run(index: int, lease: Lease) -> None:
            calls = self._call(lease, index, start, self.options.max_tokens, False)
            try:
                async with contextlib.aclosing(calls):
                    async for event in calls:
                        queue.put_nowait(event)
                queue.put_nowait(None)
            except Exception as error:
                queue.put_nowait(error)

        tasks = [asyncio.create_task(run(i, lease)) for i, lease in enumerate(leases)]
        try:
            num_running = len(tasks)
            while num_running:
                item = await queue.get()
                if item is None:
                    num_running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()


def is_lost(error: SalienceClientError) -> bool:
    """The server no longer knows the lent session, a pooled one (its TTL passed), whether
    it shares the prompt or was lent to be rewound: a fresh one is worth a try. (With
    replay on, the client re-creates such a session itself when it can.)"""
    return error.code == grpc.StatusCode.NOT_FOUND


@dataclass
class ChoiceResult:
    """Everything one choice decoded."""

    index: int
    tokens: list[TokenEvent] = field(default_factory=list)
    done: Done | None = None

    @property
    def text(self) -> str:
        """The decoded text (stop strings and special tokens excluded by the server)."""
        return "".join(token.text for token in self.tokens)


@dataclass
class GenerationResult:
    """A whole generation, collected."""

    prompt_tokens: list[TokenEvent]
    """Scored prompt positions (only with ``score_prompt``)."""
    choices: list[ChoiceResult]
    cached_tokens: int

    @property
    def completion_tokens(self) -> int:
        """Tokens decoded over all choices."""
        return sum(c.done.completion_tokens for c in self.choices if c.done is not None)


async def collect(generation: Generation) -> GenerationResult:
    """Runs ``generation`` to the end."""
    prompt_tokens: list[TokenEvent] = []
    choices = [ChoiceResult(index) for index in range(generation.n)]
    async with contextlib.aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, PromptToken):
                prompt_tokens.append(event.token)
            elif isinstance(event, ChoiceToken):
                choices[event.index].tokens.append(event.token)
            else:
                choices[event.index].done = event.done
    return GenerationResult(prompt_tokens, choices, generation.cached_tokens)
