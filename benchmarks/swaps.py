"""Question: what does offloading a session's KV to host memory and restoring it cost?

Baseline: the copies as they were made before, in the same run on the same pool: each
layer's keys and values gathered and copied to host memory on their own, the host
waiting for each (pageable memory), and copied back layer by layer. Measured: the
engine's own moves (``ModelRunner.copy_kv``): one host tensor per session, pinned
where the pool is on CUDA, its layers copied without a wait each, and one wait per
step. A pool of the default model's KV shape (30 layers, 3 KV heads of 64) holds a
``--tokens``-token session (2,000 unless told); each side swaps it out and back in.
Prints ms per round trip and measured ÷ baseline. On a CPU both are memory copies
(expect about 1); on CUDA the difference is the per-layer waits.

    .venv/bin/python -m benchmarks.swaps [--quick] [--device cuda] [--tokens 2000]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks import _cli
from salience_server.engine.evictor import SwapIn, SwapOut
from salience_server.engine.loader import resolve_device
from salience_server.engine.model_runner import ModelRunner

BLOCK_SIZE = 16
ROUNDS = 10

RoundTrip = Callable[[ModelRunner, list[int]], None]
"""Swaps a session of the given blocks out and back into them."""


def _runner(num_blocks: int, device: torch.device, dtype: torch.dtype) -> ModelRunner:
    """A ModelRunner whose pool has the default model's KV shape (its weights are tiny:
    only the pool is measured)."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=576,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().to(device)
    return ModelRunner(model, num_blocks, BLOCK_SIZE, "sdpa")


def engine_round_trip(runner: ModelRunner, block_ids: list[int]) -> None:
    runner.move_kv([SwapOut("s", block_ids, len(block_ids) * BLOCK_SIZE)])
    runner.move_kv([SwapIn("s", block_ids)])


def layer_by_layer_round_trip(runner: ModelRunner, block_ids: list[int]) -> None:
    """The copies as the engine made them before: a blocking copy per layer and tensor."""
    index = torch.tensor(block_ids, device=runner.device)
    host = [(keys[index].to("cpu"), values[index].to("cpu")) for keys, values in runner.kv_caches]
    for (keys, values), (host_keys, host_values) in zip(runner.kv_caches, host, strict=True):
        keys[index] = host_keys.to(runner.device)
        values[index] = host_values.to(runner.device)
    _synchronize(runner.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(round_trip: RoundTrip, runner: ModelRunner) -> float:
    block_ids = list(range(runner.num_blocks))
    round_trip(runner, block_ids)  # warm-up (the pinned allocator's first blocks)
    best = float("inf")
    for _ in range(3):
        _synchronize(runner.device)
        start = time.perf_counter()
        for _ in range(ROUNDS):
            round_trip(runner, block_ids)
        _synchronize(runner.device)
        best = min(best, (time.perf_counter() - start) / ROUNDS * 1e3)
    return best


def main() -> None:
    parsing = _cli.parser(__doc__)
    parsing.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parsing.add_argument("--dtype", default="bfloat16", help="the pool's dtype")
    parsing.add_argument("--tokens", type=int, default=2000, help="the session's length")
    args = parsing.parse_args()
    device = resolve_device(args.device)
    tokens = 400 if args.quick else args.tokens
    runner = _runner(-(-tokens // BLOCK_SIZE), device, getattr(torch, args.dtype))
    mib = sum(keys.nbytes + values.nbytes for keys, values in runner.kv_caches) / 2**20
    baseline, measured = _ms(layer_by_layer_round_trip, runner), _ms(engine_round_trip, runner)
    print(f"a {tokens}-token session's KV ({mib:.0f} MiB, {args.dtype}) on {device.type}:")
    print(f"  out and back in: engine {measured:.2f} ms, layer by layer {baseline:.2f} ms")
    print(f"  engine / layer by layer: {measured / baseline:.2f}")


if __name__ == "__main__":
    main()
