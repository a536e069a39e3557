"""Turns a step's logits rows into tokens and log-probabilities.

Logprobs, ranks and top-k always come from the raw distribution; sampling uses the
shaped (``penalties``) and filtered (``filters``) one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from salience_server.engine import constraints, filters, penalties
from salience_server.engine.request import SamplingParams


@dataclass
class TokenLogprob:
    logprob: float
    rank: int
    """1 for the most likely token."""
    top_logprobs: list[tuple[int, float]]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[K, V] logits of any dtype -> [K, V] float32 logprobs."""
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class Draw:
    """A row whose next token is drawn (a decode), rather than given (a scored row)."""

    params: SamplingParams
    generator: torch.Generator | None
    shaping: penalties.Shaping | None = None
    """Penalties, bias and banned tokens, when any apply to this row."""


@dataclass
class Picks:
    """The tokens of a step's rows, and the rows whose draw failed."""

    token_ids: torch.Tensor
    """[K] long, on the logits' device: the given id of a scored row, the drawn one of
    a decode row (0 where the draw failed)."""
    argmax_rows: list[int]
    """Rows whose token is their raw argmax (rank 1 without comparing)."""
    errors: dict[int, Exception] = field(default_factory=dict)
    """Rows whose draw failed: only their requests fail."""


_RANK_ROWS_CPU, _RANK_ROWS_CUDA = 16, 1024
"""Rows ranked at a time: ranking compares each row with all V logprobs, and on CPU
the [rows, V] comparison is fastest while it stays in cache (measured: 16 rows of a
49152 vocabulary rank 5x faster than 256)."""


def pick_tokens(logits: torch.Tensor, logprobs: torch.Tensor, picks: list[int | Draw]) -> Picks:
    """[K, V] raw logits and logprobs -> each row's token: the given id for a scored
    row, a draw for a decode row. Plain greedy rows share one argmax; the other draws
    are shaped, filtered and drawn together. A failure there is retried row by row, so
    that it fails the rows that caused it and no other. Nothing is copied to the host."""
    token_ids = torch.tensor(
        [pick if isinstance(pick, int) else 0 for pick in picks],
        dtype=torch.long,
        device=logprobs.device,
    )
    plain_greedy = [
        row
        for row, pick in enumerate(picks)
        if isinstance(pick, Draw) and pick.params.is_greedy and pick.shaping is None
    ]
    if plain_greedy:
        rows = torch.tensor(plain_greedy, dtype=torch.long, device=logprobs.device)
        if 2 * len(plain_greedy) >= len(picks):  # mostly decodes: scan all, copy nothing
            token_ids[rows] = torch.argmax(logprobs, dim=-1)[rows]
        else:  # mostly scored rows: copy out the few greedy ones
            token_ids[rows] = torch.argmax(logprobs[rows], dim=-1)
    chosen = set(plain_greedy)
    drawn = [row for row, pick in enumerate(picks) if isinstance(pick, Draw) and row not in chosen]
    result = Picks(token_ids, plain_greedy)
    if drawn:
        draws = [pick for pick in (picks[row] for row in drawn) if isinstance(pick, Draw)]
        # Every row drawn (a decode step): the logits as they are, not a copy of them.
        rows = logits.float() if len(drawn) == len(picks) else logits[drawn].float()
        try:
            token_ids[drawn] = draw_rows(rows, draws)
        except Exception:
            for row, one in zip(drawn, draws, strict=True):
                try:
                    token_ids[row] = draw_rows(logits[row : row + 1].float(), [one])[0]
                except Exception as error:
                    result.errors[row] = error
    return result


def verify(logits: torch.Tensor, drafts: list[int], draw: Draw) -> list[int]:
    """Speculative decoding's verification of point-mass drafts (n-gram: the draft
    distribution q puts all its mass on the draft token). ``logits`` is [D + 1, V]:
    row i predicts the token after draft i (row 0: after the last committed token).
    Returns the tokens emitted: the drafts accepted, then one more.

    Each row's token is what decoding without drafts would draw there: its argmax
    (greedy), or the inverse of its filtered distribution's CDF at the next uniform of
    the request's generator, one uniform per emitted token, as a plain decode spends
    them. Drafts are accepted while they equal those tokens; the first that does not is
    replaced by its row's token. Draft i is then accepted with probability p_i(d_i),
    rejection sampling's min(1, p/q) with q = 1, and each emitted token is distributed
    as the model's; more, a seeded call emits the tokens it emits without drafts
    (rounding aside), however much the engine drafted."""
    is_greedy = draw.params.is_greedy
    if is_greedy:
        argmax = torch.argmax(logits, dim=-1).tolist()
    else:
        filtered = filters.filter_logits(logits, [draw.params] * logits.shape[0])  # [D + 1, V]
    emitted: list[int] = []
    for row in range(len(drafts) + 1):
        if is_greedy:
            token = argmax[row]
        else:  # a uniform spent only for a row emitted
            token = int(filters.draw(filtered[row : row + 1], [draw.generator])[0])
        emitted.append(token)
        if row == len(drafts) or token != drafts[row]:
            break
    return emitted


def draw_rows(logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """[D, V] float32 raw logits -> [D] drawn token ids: shaped (penalties, bias,
    banned tokens), then greedy rows take their argmax and the others are tempered,
    filtered and drawn."""
    shaped = [index for index, d in enumerate(draws) if d.shaping is not None]
    if shaped:
        shapings = [d.shaping for d in draws if d.shaping is not None]
        part = penalties.apply(logits[shaped], shapings)
        logits = logits.clone()
        logits[shaped] = constraints.apply_bitmasks(part, [s.bitmask for s in shapings])
    token_ids = torch.empty(len(draws), dtype=torch.long, device=logits.device)
    greedy = [index for index, d in enumerate(draws) if d.params.is_greedy]
    if greedy:
        token_ids[greedy] = torch.argmax(logits[greedy], dim=-1)
    sampled = [index for index, d in enumerate(draws) if not d.params.is_greedy]
    if sampled:
        rows = logits if len(sampled) == len(draws) else logits[sampled]
        filtered = filters.filter_logits(rows, [draws[i].params for i in sampled])
        token_ids[sampled] = filters.draw(filtered, [draws[i].generator for i in sampled])
    return token_ids


def score(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_ks: list[int],
    argmax_rows: list[int] | None = None,
) -> list[TokenLogprob]:
    """Each row's logprob and rank of its token, and its top ``top_ks[row]``: computed
    for all rows on their device, then copied to the host together. Rows in
    ``argmax_rows`` hold their argmax, so their rank is 1 without comparing."""
    if not top_ks:
        return []
    scores = score_on_device(logprobs, token_ids, top_ks, argmax_rows)
    return scored_rows(top_ks, *to_host(list(scores)))


def score_on_device(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_ks: list[int],
    argmax_rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """([K] logprobs of the tokens, [K] ranks - 1, [K, k] top values, [K, k] top ids),
    still on the device; ``scored_rows`` reads them once they are on the host."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [K, 1]
    ranks = torch.zeros(len(top_ks), dtype=torch.long, device=logprobs.device)
    known = set(argmax_rows or ())
    step = _RANK_ROWS_CUDA if logprobs.is_cuda else _RANK_ROWS_CPU
    for start in range(0, len(top_ks), step):
        end = min(start + step, len(top_ks))
        if all(row in known for row in range(start, end)):
            continue  # a decode step's greedy rows: rank 1 without comparing
        # Summed as int32 (a vocabulary fits): 0.31 ms for 16 rows of 49,152, not 0.50.
        ranks[start:end] = (logprobs[start:end] > chosen[start:end]).sum(dim=1, dtype=torch.int32)
    top_k = min(max(top_ks), logprobs.shape[1])
    values, indices = _top_k_lowest_ids_first(logprobs, top_k)  # [K, top_k] each
    # Equal values in token-id order, as argmax (greedy's pick) takes the first of a
    # tie: a greedy token tied with another then leads its top list (topk orders ties
    # as it likes; in bf16, whose logits come in steps, ties are common).
    indices, by_id = indices.sort(dim=1)
    values, by_value = values.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    return chosen[:, 0], ranks, values, indices.gather(1, by_value)


def _top_k_lowest_ids_first(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk``, except that where values tied with the k-th fall on both sides of
    the cut, the lowest ids among them are kept (topk keeps any): the list is the first
    k tokens in order of value, then id, as greedy's argmax orders them. One more column
    shows where a tie crosses the cut; such rows (a few in a thousand scored in bf16)
    are redone over their whole row."""
    vocab_size = logprobs.shape[1]
    if k == 0 or k == vocab_size:
        return torch.topk(logprobs, k, dim=1)
    values, indices = torch.topk(logprobs, k + 1, dim=1)
    crossing = (values[:, k] == values[:, k - 1]).nonzero()[:, 0].tolist()
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    for row in crossing:
        scores, kth = logprobs[row], values[row, k - 1]
        above = (scores > kth).nonzero()[:, 0]
        tied = (scores == kth).nonzero()[:, 0][: k - above.numel()]  # ids ascending
        indices[row] = torch.cat([above, tied])
        values[row] = scores[indices[row]]
    return values, indices


def scored_rows(
    top_ks: list[int],
    chosen: list[float],
    ranks: list[int],
    value_rows: list[list[float]],
    index_rows: list[list[int]],
) -> list[TokenLogprob]:
    """The per-row results of ``score_on_device``, as host lists."""
    results = []
    for row, (logprob, rank) in enumerate(zip(chosen, ranks, strict=True)):
        k = top_ks[row]
        tops = list(zip(index_rows[row][:k], value_rows[row][:k], strict=True)) if k else []
        results.append(TokenLogprob(logprob, int(rank) + 1, tops))
    return results


def to_host(tensors: list[torch.Tensor], one_copy: bool | None = None) -> list[Any]:
    """Each tensor as (nested) Python lists, in one device-to-host copy (each copy is a
    sync on CUDA): flattened into one float64 buffer, which holds token ids exactly.
    On the CPU each is simply read (``one_copy`` forces the packed path, for tests)."""
    if one_copy is None:
        one_copy = any(tensor.device.type != "cpu" for tensor in tensors)
    if not one_copy:
        return [tensor.tolist() for tensor in tensors]
    # Where a part is on the host already, it joins the device's buffer (a small copy),
    # rather than failing the step.
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    packed = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors]).cpu()
    results, start = [], 0
    for tensor in tensors:
        part = packed[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
        if not tensor.dtype.is_floating_point:
            part = part.to(torch.long)
        results.append(part.tolist())
    return results


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator
