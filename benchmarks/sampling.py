"""Question: what does turning a step's logits rows into tokens and scores cost?

The engine samples and scores every logits row of a step together (one argmax for the
greedy rows, one rank and top-k pass for all rows, one copy to the host). The
baseline is the per-row loop it replaced: for each row an argmax, a rank and a top-k,
each read back with ``.item()`` / ``.tolist()``, which on CUDA is a device sync each.
Two shapes, with the default model's vocabulary (49152): 64 greedy decode rows (a busy
decode step) and 512 scored rows with top-5 logprobs (a scoring prefill). Prints the
time per step of each and the ratio. Runs on CUDA when there is one.

    python -m benchmarks.sampling [--quick]
"""

from __future__ import annotations

import functools
import time

import torch

from benchmarks._cli import is_quick
from salience_server.engine import sampler, scoring
from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import planned

VOCAB = 49152
ROUNDS = 20
QUICK_ROUNDS = 1


def per_row(logprobs: torch.Tensor, picks: list[int | sampler.Draw], top_k: int) -> list:
    """The baseline: one row at a time, every value read back on its own."""
    results = []
    for row, pick in zip(logprobs, picks, strict=True):
        token_id = int(torch.argmax(row).item()) if isinstance(pick, sampler.Draw) else pick
        chosen = row[token_id]
        rank = int((row > chosen).sum().item()) + 1
        tops = []
        if top_k:
            values, indices = torch.topk(row, top_k)
            tops = list(zip(indices.tolist(), values.tolist(), strict=True))
        results.append((token_id, float(chosen.item()), rank, tops))
    return results


def batched(
    logprobs: torch.Tensor, picks: list[int | sampler.Draw], top_k: int, logits: torch.Tensor
) -> list:
    plan = planned(functools.partial(sampler.plan_picks, picks, [], VOCAB), logits.device)
    chosen = sampler.pick_tokens(logits, logprobs, plan)
    scores = scoring.score(logprobs, chosen.token_ids, [top_k] * len(picks), chosen.argmax_rows)
    return list(zip(chosen.token_ids.tolist(), scores, strict=True))


def timed(rounds: int, function, *args) -> float:  # type: ignore[no-untyped-def]
    function(*args)  # warm up
    if args[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        function(*args)
    return (time.perf_counter() - start) / rounds


def main() -> None:
    rounds = QUICK_ROUNDS if is_quick(__doc__) else ROUNDS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    print(f"device: {device}, vocabulary {VOCAB}, {rounds} rounds each")
    greedy = sampler.Draw(SamplingParams(), None)
    for name, rows, top_k in [("64 greedy decode rows", 64, 0), ("512 scored rows, top-5", 512, 5)]:
        logits = torch.randn(rows, VOCAB, generator=generator).to(device)
        logprobs = scoring.log_softmax(logits)
        if top_k:
            picks: list[int | sampler.Draw] = torch.randint(VOCAB, (rows,)).tolist()
        else:
            picks = [greedy] * rows
        baseline = per_row(logprobs, picks, top_k)
        ours = batched(logprobs, picks, top_k, logits)
        assert [b[0] for b in baseline] == [o[0] for o in ours]
        assert [b[2] for b in baseline] == [o[1].rank for o in ours]
        slow = timed(rounds, per_row, logprobs, picks, top_k)
        fast = timed(rounds, batched, logprobs, picks, top_k, logits)
        print(
            f"{name}: per row {slow * 1e3:.2f} ms, together {fast * 1e3:.2f} ms "
            f"-> per-row / together = {slow / fast:.2f}x"
        )


if __name__ == "__main__":
    main()
