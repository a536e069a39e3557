"""Question: how long does the agent workload take through the shim, in float32, in
bfloat16, and in bfloat16 with n-gram speculation?

The workload of issue 13: a ~300-token system prompt, 70-token user turns and 16
streamed greedy tokens per turn, through the openai SDK (each turn resends the whole
conversation, as a stateless chat client does; the shim's session pool keeps the KV).
Two shapes: 1 conversation x 10 turns, and 4 conversations x 8 turns. Baseline: the
float32 server in the same run; prints each configuration's total time and its ratio.
Where llama-cpp-python is installed (``pip install -e '.[llama]'``), its OpenAI server on
the GGUF the model was converted from (SmolLM2's is Q4_1: 98 MB of weights against
Salience's 538 MB in float32) runs the same turns as a reference, with its default of
keeping only the last position's logits.

    .venv/bin/python -m benchmarks.agent_speed [--quick]
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
import traceback
from pathlib import Path

from benchmarks import _cli
from benchmarks import _launch as launch
from benchmarks import _openai_workloads as workloads
from benchmarks._prompts import Texts, make_plan
from benchmarks._sizes import Sizes
from benchmarks.peers import model_files

CONFIGURATIONS = {
    "fp32": ("float32", []),
    "bf16": ("bfloat16", []),
    "bf16 + ngram": ("bfloat16", ["--speculative", "ngram"]),
}
SHAPES = {"1 x 10": (1, 10), "4 x 8": (4, 8)}
KV_TOKENS = 16384


async def run_shapes(
    running: launch.Running, texts: Texts, shapes: dict[str, tuple[int, int]], name: str
) -> dict[str, float]:
    """Each shape's total seconds on one server, through one client (closed at the end)."""
    totals = {}
    async with workloads.client(running.base_url) as api:
        await workloads.warm_up(api, running.model)
        for shape, (conversations, turns) in shapes.items():
            sizes = dataclasses.replace(
                Sizes(), num_conversations=conversations, num_turns=turns, turn_decode_tokens=16
            )
            result = await workloads.agent(api, running.model, make_plan(texts, sizes), texts, name)
            totals[shape] = result["total_s"]
            print(f"[{name}] {shape}: {result['total_s']:.1f} s", flush=True)
    return totals


def main() -> None:
    args = _cli.parse_args(__doc__)
    from transformers import AutoTokenizer

    shapes = {"1 x 3": (1, 3), "2 x 2": (2, 2)} if args.quick else SHAPES
    logs = Path(tempfile.mkdtemp(prefix="salience-agent-speed-"))
    totals: dict[tuple[str, str], float] = {}
    servers: dict[str, tuple[launch.ModelFiles, launch.Launch]] = {}
    for name, (dtype, flags) in CONFIGURATIONS.items():
        files = model_files(None, dtype)
        server = launch.salience(files, launch.Budget(KV_TOKENS, "cpu", dtype))
        server.command += flags
        servers[name] = files, server
    files = model_files(None, "float32")
    llama = launch.llama_cpp(
        files, launch.Budget(KV_TOKENS, "cpu", "float32"), sys.executable, False
    )
    if llama.unavailable:
        print(f"[llama-cpp] skipped: {llama.unavailable}", flush=True)
    else:
        servers["llama-cpp"] = files, llama
    failed: dict[str, str] = {}
    for name, (files, server) in servers.items():
        texts = Texts(AutoTokenizer.from_pretrained(files.directory))
        print(f"[{name}] starting", flush=True)
        try:
            with launch.started(server, logs / f"{name}.log", 600) as running:
                for shape, total in asyncio.run(run_shapes(running, texts, shapes, name)).items():
                    totals[name, shape] = total
        except Exception as error:  # one server failing does not lose the others' figures
            failed[name] = "".join(traceback.format_exception_only(error)).strip()
            print(f"[{name}] failed: {failed[name]}", flush=True)
    print()
    for shape in shapes:
        base = totals.get(("fp32", shape))
        cells = []
        for name in servers:
            total = totals.get((name, shape))
            if total is None:
                cells.append(f"{name} failed")
            else:
                cells.append(f"{name} {total:.1f} s" + (f" ({total / base:.2f}x)" if base else ""))
        print(f"{shape}: {', '.join(cells)}")
    for name, reason in failed.items():
        print(f"{name} failed: {reason.splitlines()[0]} (server log: {logs / f'{name}.log'})")


if __name__ == "__main__":
    main()
