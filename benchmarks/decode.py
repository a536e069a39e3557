"""Question: what does one decode step cost in Salience's engine, in float32 and in
bfloat16, against a plain transformers decode loop?

Baseline: the same model's plain transformers greedy loop (DynamicCache, batch 1 and a
padded batch of 8), in this process, in the same dtype. Measured: the engine stepped
in this process (no gRPC), sessions decoding together after a 103-token prompt. Prints
ms per step and the ratios: engine ÷ transformers in each dtype, and bf16 ÷ fp32 for
each.

    .venv/bin/python benchmarks/decode.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model, resolve_model_path
from salience_server.engine.request import GenerateParams

PROMPT_TOKENS = 103


def engine_ms_per_step(dtype: str, batch: int, num_steps: int) -> float:
    engine = Engine(load_model(ModelConfig(dtype=dtype)), EngineConfig(kv_cache_bytes=256 << 20))
    sessions = [engine.open_session() for _ in range(batch)]
    prompts = [[1000 + 7 * i + j for j in range(PROMPT_TOKENS)] for i in range(batch)]

    def run(max_tokens: int) -> None:
        for session, prompt in zip(sessions, prompts, strict=True):
            append = prompt if session.length == 0 else []
            params = GenerateParams(
                session_id=session.session_id,
                append_tokens=append,
                offset=session.length,
                max_tokens=max_tokens,
                ignore_eos=True,
            )
            engine.submit(params, lambda event: None)
        while engine.scheduler.has_work():
            engine.step()

    run(4)  # prefill and warm-up
    start = time.perf_counter()
    run(num_steps)
    return (time.perf_counter() - start) / num_steps * 1e3


def transformers_ms_per_step(dtype: str, batch: int, num_steps: int) -> float:
    path, _ = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    prompt = torch.tensor([[1000 + 7 * i + j for j in range(PROMPT_TOKENS)] for i in range(batch)])
    with torch.inference_mode():
        output = model(prompt, use_cache=True)
        cache, tokens = output.past_key_values, output.logits[:, -1].argmax(-1)
        for step in range(num_steps + 4):
            if step == 4:
                start = time.perf_counter()
            output = model(tokens[:, None], past_key_values=cache, use_cache=True)
            cache, tokens = output.past_key_values, output.logits[:, -1].argmax(-1)
    return (time.perf_counter() - start) / num_steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: under two minutes")
    args = parser.parse_args()
    num_steps = 12 if args.quick else 48
    figures: dict[tuple[str, int], tuple[float, float]] = {}
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            engine = engine_ms_per_step(dtype, batch, num_steps)
            plain = transformers_ms_per_step(dtype, batch, num_steps)
            figures[dtype, batch] = (engine, plain)
            print(
                f"{dtype:>8} batch {batch}: engine {engine:6.1f} ms/step, transformers loop "
                f"{plain:6.1f} ms/step, engine/transformers {engine / plain:.2f}",
                flush=True,
            )
    for batch in (1, 8):
        engine_ratio = figures["bfloat16", batch][0] / figures["float32", batch][0]
        plain_ratio = figures["bfloat16", batch][1] / figures["float32", batch][1]
        print(
            f"batch {batch}: bf16/fp32 step time: engine {engine_ratio:.2f}, "
            f"transformers {plain_ratio:.2f}"
        )


if __name__ == "__main__":
    main()
