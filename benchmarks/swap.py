"""Question: is offloading an evicted session's KV to host memory (``--host-kv-memory``)
cheaper than dropping it and recomputing it on its next call?

Baseline: recomputing, the prefill of the session's ``--context`` tokens (2,000 unless
told) in a fresh session of the engine. Measured: the runner's swap-out of those tokens'
KV blocks to host memory and their swap-in to other blocks, as a step makes them (all
layers, keys and values). Both in this process, in the same dtype, on the same device
(CUDA when present). Prints ms for each and the ratio (swap-out + swap-in) ÷ prefill:
below 1, offloading pays. ``--model`` takes another model directory or GGUF (the default
model's), ``--device`` another device.

    .venv/bin/python -m benchmarks.swap [--quick] [--context 8000] [--model DIR]
        [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import time

import torch

from benchmarks import _cli
from benchmarks.decode import EngineDecoder, Where
from salience_server.engine.evictor import SwapIn, SwapOut
from salience_server.engine.session import Session

CONTEXT_TOKENS = 2000
QUICK_CONTEXT_TOKENS = 400


def _synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _swap_ms(decoder: EngineDecoder, session: Session) -> tuple[float, float]:
    """(swap-out ms, swap-in ms) of ``session``'s blocks, through the runner alone: the
    blocks are not given back, so the swap-in writes the same blocks it read."""
    runner = decoder.engine.runner
    blocks = list(session.block_table)
    _synchronized(runner.device)
    start = time.perf_counter()
    runner.move_kv([SwapOut(session.session_id, blocks, session.num_computed)])
    _synchronized(runner.device)
    swapped_out = time.perf_counter()
    runner.move_kv([SwapIn(session.session_id, blocks)])
    _synchronized(runner.device)
    done = time.perf_counter()
    return (swapped_out - start) * 1e3, (done - swapped_out) * 1e3


def _prefill_ms(decoder: EngineDecoder) -> float:
    """One fresh session's prefill of the decoder's first prompt (and its first token)."""
    engine = decoder.engine
    prompt = decoder.prompts[0]
    fresh = engine.open_session()
    try:
        start = time.perf_counter()
        decoder.submit(fresh, prompt, max_tokens=1)
        while engine.scheduler.has_work():
            engine.step()
        return (time.perf_counter() - start) * 1e3
    finally:
        engine.close_session(fresh.session_id)


def main() -> None:
    parsing = _cli.parser(__doc__)
    parsing.add_argument("--context", type=int, default=0, help="tokens in the session")
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    parsing.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parsing.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    args = parsing.parse_args()
    context = args.context or (QUICK_CONTEXT_TOKENS if args.quick else CONTEXT_TOKENS)
    rounds = 2 if args.quick else 4
    decoder = EngineDecoder(args.dtype, 1, context, Where(args.model, args.device))
    session = decoder.sessions[0]
    runner = decoder.engine.runner
    kv_mib = session.num_computed * decoder.engine.kv_bytes_per_token / 2**20
    out_ms, in_ms, prefill_ms = float("inf"), float("inf"), float("inf")
    for _ in range(rounds):  # taking turns, so that a slow moment hurts both alike
        swapped = _swap_ms(decoder, session)
        out_ms, in_ms = min(out_ms, swapped[0]), min(in_ms, swapped[1])
        prefill_ms = min(prefill_ms, _prefill_ms(decoder))
    print(
        f"a {session.num_computed}-token session ({kv_mib:.1f} MiB of KV, {args.dtype}) on "
        f"{runner.device}: swap-out {out_ms:.2f} ms, swap-in {in_ms:.2f} ms; "
        f"recomputing it (prefill) {prefill_ms:.1f} ms"
    )
    print(f"offload round trip ÷ recompute: {(out_ms + in_ms) / prefill_ms:.3f}")


if __name__ == "__main__":
    main()
