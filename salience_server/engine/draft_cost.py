"""What a step verifying speculative drafts costs on this device, measured at start-up.

A step verifying d drafts feeds 1 + d rows where a plain decode step feeds one, and
what the extra rows cost depends on the device and dtype as much as on the model: on an
AVX2 CPU in float32 the first extra row turned matrix-vector products into matrix
products (+0.6 of a step) and later ones added 0.1 each; on a CPU whose cache holds the
model, float32 rows cost nothing up to 2 and then about 0.2 each; with AMX in bfloat16,
16 rows cost what one does; on a GPU a step is bound by reading the weights. A fixed
guess per device type was wrong on all but one of these.

So the engine times whole forward passes of the model as it starts (``--speculative-
cost`` skips this): one sequence over ``CONTEXT_TOKENS`` cached tokens feeding 1, 2 and
1 + K rows, with the logprobs and argmax of every row, as a verification asks;
``DraftCost`` is fitted to the median times. Timing the Linear layers alone, as this did
before, missed what else grows with the rows: on an AVX-512 BF16 CPU in bfloat16 (one
row: FBGEMM's float16 kernel; five: oneDNN's), it put a 4-draft step at 1.13-1.22 plain
steps where the engine's steps took 1.39-1.42 (attention over 15 folded query rows
rather than 3 among the rest; a 5-row pass took 1.21x a 1-row one over 64 cached tokens,
1.30x over 256, 1.37x over 1,024); the proposer then drafted at acceptance rates where
drafting lost (free chat: 0.89x the plain speed). Passes of ~30-50 ms on the 2-core CPU
varied by up to 50% from one to the next, hence medians of ``PASSES``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from salience_server.engine import layer_timing
from salience_server.engine.batch import ForwardBatch

if TYPE_CHECKING:
    from salience_server.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 512
"""Cached tokens the timed passes attend to (fewer where the pool holds fewer)."""
PASSES = 9
"""Timed passes of each width (the widths taking turns, after one untimed each)."""


@dataclass(frozen=True)
class DraftCost:
    """What a step verifying d > 0 drafts costs, in decode steps: ``1 + switch + row * d``."""

    switch: float
    row: float

    def steps(self, num_drafts: int) -> float:
        return 1.0 + (self.switch + self.row * num_drafts if num_drafts else 0.0)


def measure(
    runner: ModelRunner, max_drafts: int, uses_mrope: bool, max_context: int | None = None
) -> DraftCost:
    """The cost of verifying up to ``max_drafts`` drafts, fitted to the median time
    ``runner`` takes for a pass of 1, 2 and ``1 + max_drafts`` rows, at positions a
    session may hold: below ``max_context`` (the model's and the pool's limits, or the
    pool's where None). No session holds more, so no step verifies more; wider passes,
    or ones past the positions a model with learned positions has (GPT-2, OPT), ended
    the start in an IndexError's traceback. The passes write KV into the pool's first
    blocks, which hold nothing before the engine serves."""
    start = time.perf_counter()
    room = runner.num_blocks * runner.block_size
    if max_context is not None:
        room = min(room, max_context)
    max_drafts = max(1, min(max_drafts, room - 1))
    rows_timed = sorted({1, 2, 1 + max_drafts})
    capacity = room - rows_timed[-1]
    context = max(0, min(CONTEXT_TOKENS, capacity))
    batches = {
        rows: ForwardBatch.synthetic(context, rows, runner.block_size, uses_mrope)
        for rows in rows_timed
    }
    times: dict[int, list[float]] = {rows: [] for rows in rows_timed}
    for attempt in range(PASSES + 1):
        for rows, batch in batches.items():
            layer_timing.synchronize(runner.device)
            began = time.perf_counter()
            logits = runner.execute(batch).logits
            # What the sampler then does with a verification's rows: their logprobs, and
            # their argmax on the host.
            torch.log_softmax(logits.float(), dim=-1)
            torch.argmax(logits, dim=-1).tolist()
            if attempt:  # the first pass of each width is not timed
                times[rows].append(time.perf_counter() - began)
    cost = fit({rows: statistics.median(t) for rows, t in times.items()}, max_drafts)
    log.info(
        "speculation: a step verifying d drafts costs 1 + %.2f + %.2f d plain steps "
        "(measured over %d cached tokens in %.1f s; --speculative-cost sets it)",
        cost.switch,
        cost.row,
        context,
        time.perf_counter() - start,
    )
    return cost


def fit(seconds: dict[int, float], max_drafts: int) -> DraftCost:
    """``DraftCost`` through the measured points: ``seconds[r]`` is one pass at r rows.
    One draft costs ``seconds[2] / seconds[1]`` steps; each further one the slope up to
    ``1 + max_drafts`` rows. Never negative: a faster pass at more rows is noise."""
    one_draft = seconds[2] / seconds[1]
    row = 0.0
    if max_drafts > 1:
        row = max(0.0, (seconds[1 + max_drafts] / seconds[1] - one_draft) / (max_drafts - 1))
    return DraftCost(switch=max(0.0, one_draft - 1.0 - row), row=row)
