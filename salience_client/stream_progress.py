"""``StreamProgress``: what one Generate call has streamed so far, so that a stream
broken mid-way (SPEC 2.7) resumes asking only for the tokens not yet received."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from salience_client.pb import salience_pb2 as pb
from salience_client.types import Done, TokenEvent


class StreamProgress:
    """What one Generate call has streamed so far, so that a broken stream can resume
    asking only for the rest.

    Once a token was decoded, the resuming call continues from the last one received;
    before that (only scored prompt positions arrived, or nothing) the call is made
    again and the events already delivered are dropped. Exact for greedy decoding, its
    penalties, stop strings and constraint included (``decode_start``: the server counts
    the tokens decoded before the break as the call's, its stop strings' held-back text
    goes on, and its grammar reads them again), and for seeded sampling (the server moves
    the seed on past the tokens decoded before the break); an unseeded sampled
    continuation is a fresh draw.
    """

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        """The call as the caller made it."""
        self.is_accepted = False
        """The server applied the append: an event arrived."""
        self.is_resumed = False
        """The stream continues from decoded tokens received before a break."""
        self.decoded_ids: list[int] = []
        self.next_position = 0
        """Positions below this have delivered their events."""
        self.is_replayed = False
        """The session was re-created during the call: what the server then held of the
        prompt, the replay had just put in."""
        self.is_break_counted = False
        """The current break was counted (its resuming calls may fail again and again
        while no replica answers: one break, one resume); an event starts afresh."""
        self.is_recorded = False
        """The session's history holds what the call committed, as far as the client
        saw (``SessionBase._commit``): each token decoded since is added to it alone."""

    @property
    def base_length(self) -> int:
        """The session's length once the append is in."""
        return self.request.offset + len(self.request.append_tokens)

    @property
    def replay_length(self) -> int:
        """Positions a replay must restore before the next try."""
        if self.decoded_ids:
            return self.base_length + len(self.decoded_ids)
        return self.request.offset

    def observe(self, event: TokenEvent | Done) -> bool:
        """Notes an event; False for one delivered before (a call made again)."""
        self.is_accepted = True
        self.is_break_counted = False
        if isinstance(event, Done):
            return True
        if event.position < self.next_position:
            return False
        self.next_position = event.position + 1
        if not event.is_prefill:
            self.decoded_ids.append(event.token_id)
        return True

    def committed_ids(self) -> list[int]:
        """What the call put after ``request.offset`` as far as the client saw."""
        return [*self.request.append_tokens, *self.decoded_ids] if self.is_accepted else []

    def next_request(self, eos_token_ids: Collection[int]) -> tuple[pb.GenerateRequest, str]:
        """The call that continues this one, and the finish reason to report when it
        only settles the session (nothing is left to decode); "" otherwise."""
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        request.truncating = True  # whatever the broken call left on a live replica goes
        if not self.decoded_ids:
            return request, ""
        self.is_resumed = True
        num_decoded = len(self.decoded_ids)
        del request.append_tokens[:]
        request.offset = self.base_length + num_decoded
        request.decode_start = self.base_length  # penalties, stop strings, grammar go on
        request.max_tokens = max(0, self.request.max_tokens - num_decoded)
        # min_tokens stays the call's: the server counts it from decode_start.
        for ranges in (request.logprobs_ranges, request.readout_ranges):
            kept = [
                pb.PositionRange(start=max(r.start, request.offset), end=r.end)
                for r in ranges
                if max(r.start, request.offset) < r.end
            ]
            del ranges[:]
            ranges.extend(kept)
        finish_reason = ""
        if self._has_stopped(eos_token_ids):
            finish_reason = "stop"
        elif request.max_tokens == 0:
            finish_reason = "length"
        if finish_reason:
            request.max_tokens = 0
        return request, finish_reason

    def needs_eos_ids(self) -> bool:
        """Whether ``next_request`` must know the model's EOS ids (the last decoded token
        may have ended the call just before its Done was lost)."""
        return bool(self.decoded_ids and not self.request.ignore_eos)

    def _has_stopped(self, eos_token_ids: Collection[int]) -> bool:
        last = self.decoded_ids[-1]
        if last in self.request.stop_token_ids:
            return True
        is_min_met = len(self.decoded_ids) >= self.request.min_tokens
        return not self.request.ignore_eos and is_min_met and last in eos_token_ids

    @property
    def cached_bound(self) -> int:
        """The most the unbroken call could have found cached: the positions before its
        offset, less the one before a range reaching back to the offset or before it,
        and what follows (fed again to score the range). The resuming call's own count
        is of a longer prompt (it reported the whole appended prompt cached). After a
        call that decoded, the server never fed the session's last token, which the
        client cannot tell: the bound is then one more than the count."""
        scored_from = [
            r.start
            for ranges in (self.request.logprobs_ranges, self.request.readout_ranges)
            for r in ranges
            if r.start <= self.request.offset
        ]
        return min([self.request.offset, *(max(0, start - 1) for start in scored_from)])

    def merged_done(self, done: Done, finish_reason: str) -> Done:
        """The Done the caller sees: the whole call's counts, whatever resumed it. After
        a replay nothing of the prompt was cached: the positions before the call's
        offset were recomputed."""
        if self.is_resumed:
            base = self.base_length
            done = dataclasses.replace(
                done,
                prompt_tokens=base,
                completion_tokens=len(self.decoded_ids),
                finish_reason=finish_reason or done.finish_reason,
                cached_tokens=min(done.cached_tokens, self.cached_bound),
            )
        if self.is_replayed:
            replayed = min(done.cached_tokens, self.request.offset)
            done = dataclasses.replace(
                done, cached_tokens=0, recomputed_tokens=done.recomputed_tokens + replayed
            )
        return done
