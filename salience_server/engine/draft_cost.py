"""What a step verifying speculative drafts costs on this device, measured at start-up.

A step verifying d drafts multiplies 1 + d rows where a plain decode step multiplies one,
and what the extra rows cost depends on the device and dtype as much as on the model.
Measured over the default model's Linear layers: on an AVX2 CPU in float32 the first
extra row turned matrix-vector products into matrix products (+0.6 of a step) and later
ones added 0.1 each; on a CPU whose cache holds the model, float32 rows cost nothing up
to 2 and then about 0.2 each; with AMX in bfloat16, 16 rows cost what one does; on a
GPU a step is bound by reading the weights. A fixed guess per device type was wrong on
all but one of these, and a speculative float32 edit decoded 1.76x faster with it where
a measured cost gave 1.88x. So the engine times the model's own Linear layers at 1, 2
and 1 + K rows as it starts (``--speculative-cost`` skips this), and fits
``DraftCost`` to the times. Linear layers only: the rest of a step grows less with its
rows, so the fit errs towards drafting less.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from salience_server.engine import layer_timing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftCost:
    """What a step verifying d > 0 drafts costs, in decode steps: ``1 + switch + row * d``."""

    switch: float
    row: float

    def steps(self, num_drafts: int) -> float:
        return 1.0 + (self.switch + self.row * num_drafts if num_drafts else 0.0)


def measure(model: torch.nn.Module, max_drafts: int) -> DraftCost:
    """The cost of verifying up to ``max_drafts`` drafts with ``model``, fitted to the
    time its Linear layers take at 1, 2 and ``1 + max_drafts`` rows."""
    layers = layer_timing.timed_layers(model)
    if not layers:
        log.warning("speculation: no Linear layers to time; drafting as if rows were free")
        return DraftCost(0.0, 0.0)
    start = time.perf_counter()
    # The Linear layers take what the embedding outputs: float32 where 16-bit arithmetic
    # is emulated (``cpu_matmul.compute_in_float32``), else the model's dtype.
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    device = embedding.weight.device
    dtype = embedding(torch.zeros(1, dtype=torch.long, device=device)).dtype
    rows_timed = sorted({1, 2, 1 + max_drafts})
    products = [(layer, layer.in_features) for layer in layers]
    seconds = {
        rows: layer_timing.pass_seconds(products, rows, dtype, device) for rows in rows_timed
    }
    cost = fit(seconds, max_drafts)
    log.info(
        "speculation: a step verifying d drafts costs 1 + %.2f + %.2f d plain steps "
        "(measured in %.1f s; --speculative-cost sets it)",
        cost.switch,
        cost.row,
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
