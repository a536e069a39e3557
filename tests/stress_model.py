"""The stress test's model of the server (``tests/integration/test_stress.py``): what
each session holds as the client knows it, the oracle (one plain transformers forward
pass over a session's tokens and images), and the check of one finished call against
both."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer
from tests.vision_support import make_image

TOLERANCE = 1e-4
IMAGE_SIZE = (56, 56)  # 4 placeholder tokens
READOUT_LAYER = 0


@dataclass
class SessionModel:
    """What a session holds, as the client knows it."""

    token_ids: list[int] = field(default_factory=list)
    images: list[tuple[int, int]] = field(default_factory=list)
    """(first placeholder position, image seed), in session order."""

    def copy(self) -> SessionModel:
        return SessionModel(list(self.token_ids), list(self.images))

    def rewind_points(self) -> list[int]:
        """Offsets a rewind may go to: not between an image's start token and its end."""
        cut = set()
        for start, _ in self.images:
            cut.update(range(start, start + 5))  # the pads and the end token after them
        return [p for p in range(len(self.token_ids) + 1) if p not in cut]


class Oracle:
    """One plain forward pass of the reference model per distinct session content."""

    def __init__(self, server: RunningServer, readout_vectors: torch.Tensor) -> None:
        self.server = server
        self.model = server.extra["reference"]
        self.processor = server.engine.loaded.image_processor
        self.readout_vectors = readout_vectors  # [n_concepts, hidden]
        self.info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._image_positions = torch.zeros(0, dtype=torch.bool)
        self.model.model.get_placeholder_mask = self._placeholder_mask

    def _placeholder_mask(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, **features: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers takes every image token for a placeholder of an image; here only
        the images' own are (``forward``)."""
        images = self._image_positions[..., None].expand_as(inputs_embeds)
        return images, torch.zeros_like(images)

    def forward(self, session: SessionModel) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, V] logprobs, [L, n_concepts] readout) of the session's tokens."""
        key = (tuple(session.token_ids), tuple(session.images))
        if key not in self._cache:
            input_ids = torch.tensor([session.token_ids])
            # The images' own placeholders. A token the model decoded that happens to be
            # the image token is text, to the server and so to the oracle.
            self._image_positions = torch.zeros_like(input_ids, dtype=torch.bool)
            for start, _ in session.images:
                self._image_positions[0, start : start + 4] = True
            inputs = {
                "input_ids": input_ids,
                "mm_token_type_ids": self._image_positions.int(),
            }
            if session.images:
                features = [
                    self.processor(images=[make_image(seed, IMAGE_SIZE)], return_tensors="pt")
                    for _, seed in session.images
                ]
                inputs["pixel_values"] = torch.cat([f["pixel_values"] for f in features])
                inputs["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in features])
            with torch.no_grad():
                output = self.model(**inputs, output_hidden_states=True)
            logprobs = torch.log_softmax(output.logits[0].float(), dim=-1)
            hidden = output.hidden_states[READOUT_LAYER + 1][0].float()
            self._cache[key] = (logprobs, hidden @ self.readout_vectors.T)
        return self._cache[key]


def _in(position: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in ranges)


@dataclass
class Call:
    """One Generate call the machine makes, and what it must get back."""

    session_id: str
    offset: int
    append: list[int]
    max_tokens: int
    logprobs_ranges: list[tuple[int, int]]
    readout_ranges: list[tuple[int, int]]
    top_k: int
    stop_token_ids: list[int]

    def request(self) -> pb.GenerateRequest:
        def ranges(pairs):
            return [pb.PositionRange(start=s, end=e) for s, e in pairs]

        return pb.GenerateRequest(
            session_id=self.session_id,
            append_tokens=self.append,
            offset=self.offset,
            truncating=True,
            max_tokens=self.max_tokens,
            logprobs_ranges=ranges(self.logprobs_ranges),
            readout_ranges=ranges(self.readout_ranges),
            logprob_top_k=self.top_k,
            stop_token_ids=self.stop_token_ids,
        )


def check_call(
    oracle: Oracle, before: SessionModel, call: Call, events: list[pb.Token], done: pb.Done
) -> SessionModel:
    """Checks one finished call against the model and the oracle; returns the session
    as it is now."""
    after = SessionModel(
        before.token_ids[: call.offset] + call.append,
        [(start, seed) for start, seed in before.images if start < call.offset],
    )
    prompt_len = len(after.token_ids)
    decoded = [e for e in events if not e.is_prefill]
    after.token_ids += [e.id for e in decoded]
    assert done.prompt_tokens == prompt_len
    assert done.completion_tokens == len(decoded) == done.total_tokens - prompt_len
    first = min([call.offset] + [s for s, _ in call.logprobs_ranges + call.readout_ranges])
    scored = call.logprobs_ranges + call.readout_ranges
    owed = [p for p in range(first, prompt_len) if _in(p, scored)]
    owed += list(range(prompt_len, len(after.token_ids)))
    assert [e.position for e in events] == owed, "the stream is not exactly the positions owed"
    if not events:
        return after
    logprobs, readout = oracle.forward(after)
    pads = {p for start, _ in after.images for p in range(start, start + 4)}
    for event in events:
        p = event.position
        assert event.id == after.token_ids[p]
        assert event.is_prefill == (p < prompt_len)
        scored_here = not event.is_prefill or _in(p, call.logprobs_ranges)
        if p == 0 or p in pads or not scored_here:  # read out only: no logits computed
            assert event.sampled_logprob == 0.0 and not event.top_logprobs
        else:
            assert abs(event.sampled_logprob - logprobs[p - 1, event.id].item()) < TOLERANCE
            if not event.is_prefill:
                assert event.id == int(logprobs[p - 1].argmax()), "not the greedy token"
            if call.top_k and _in(p, call.logprobs_ranges):
                want = logprobs[p - 1].topk(call.top_k)
                assert [t.token_id for t in event.top_logprobs] == want.indices.tolist()
        if _in(p, call.readout_ranges) and p > 0:
            got = torch.tensor(list(event.readout))
            assert (got - readout[p - 1]).abs().max().item() < TOLERANCE
    stops = set(call.stop_token_ids) | set(oracle.info.eos_token_ids)
    for index, event in enumerate(decoded):  # the call stops at its first stop token
        assert (event.id in stops) == (index == len(decoded) - 1 and done.finish_reason == 1)
    if done.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(decoded) == call.max_tokens
    return after
