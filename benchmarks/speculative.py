"""Question: how much faster does n-gram speculation (drafts from the session's own
history) decode, where agents spend their time?

Baseline: the same server without speculation, in the same run. Three workloads on the
default model, greedy, one session at a time (batch 1): an agent editing a file it was
shown (the reply repeats most of the file), a summary of a tool output, and free chat.
For each: decode tokens per second with and without ``--speculative ngram`` (at the
default cap of 4 draft tokens and at 8), the speed-up, the draft acceptance rate, and
how much of the reply copies the prompt (so that the workloads are what they claim).
Greedy outputs must be identical in float32 (checked); in bfloat16 a verification
pass rounds differently from single steps (as batching does), so where outputs part
is printed instead.

    .venv/bin/python -m benchmarks.speculative [--quick] [--dtype bfloat16]
"""

from __future__ import annotations

import contextlib
import json
import time

import grpc
import torch

from benchmarks import _cli
from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine import draft_cost, paged_attention
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner
from salience_server.engine.ngram import DraftCost, NgramIndex

FILE = "\n".join(
    [
        "import json",
        "from pathlib import Path",
        "",
        "",
        "def load_config(path: Path) -> dict:",
        '    """Reads the configuration file and returns its settings."""',
        "    with path.open() as handle:",
        "        settings = json.load(handle)",
        '    settings.setdefault("retries", 3)',
        '    settings.setdefault("timeout_s", 10.0)',
        "    return settings",
        "",
        "",
        "def save_config(path: Path, settings: dict) -> None:",
        '    """Writes the settings back, sorted, two-space indented."""',
        "    with path.open('w') as handle:",
        "        json.dump(settings, handle, indent=2, sort_keys=True)",
        "",
        "",
        "def merge_configs(base: dict, override: dict) -> dict:",
        '    """Settings of ``override`` win over those of ``base``."""',
        "    merged = dict(base)",
        "    merged.update(override)",
        "    return merged",
    ]
)
TOOL_OUTPUT = json.dumps(
    {
        "query": "open issues labelled bug",
        "results": [
            {"id": 101 + i, "title": f"Crash when saving file {i}", "state": "open", "comments": i}
            for i in range(12)
        ],
    },
    indent=1,
)
WORKLOADS = {
    "edit": [
        {"role": "system", "content": "You are a careful coding assistant."},
        {
            "role": "user",
            "content": f"Here is config.py:\n```python\n{FILE}\n```\nRewrite this file exactly "
            "as it is, changing only the name load_config to read_config. Output the complete "
            "file.",
        },
    ],
    "summary": [
        {"role": "system", "content": "You are an agent that uses tools."},
        {"role": "user", "content": f"The search tool returned:\n{TOOL_OUTPUT}\nList the titles."},
    ],
    "chat": [{"role": "user", "content": "Tell me a short story about a dragon and a lighthouse."}],
}


DEFAULT = EngineConfig()
DRAFT_LENGTHS = (4, 8)
"""``--num-speculative-tokens`` values compared: the default, and a longer cap."""


def decode(target: str, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float, pb.Done]:
    """(tokens, decode tok/s, Done) of one greedy call on a fresh session."""
    with grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        request = pb.GenerateRequest(
            session_id=session_id, append_tokens=prompt_ids, max_tokens=max_tokens
        )
        tokens, times, done = [], [], None
        for event in stub.Generate(request):
            if event.HasField("token"):
                tokens.append(event.token.id)
                times.append(time.perf_counter())
            else:
                done = event.done
        assert done is not None
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return tokens, rate, done


def prompts(target: str) -> dict[str, list[int]]:
    with grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        return {
            name: list(
                stub.Tokenize(
                    pb.TokenizeRequest(
                        messages=pb.ChatMessages(messages_json=json.dumps(messages)),
                        add_generation_prompt=True,
                    )
                ).token_ids
            )
            for name, messages in WORKLOADS.items()
        }


def copied_fraction(prompt_ids: list[int], reply: list[int], n: int = 6) -> float:
    """The share of the reply's tokens that end an n-gram of the prompt: how much of
    the reply repeats what the session already held."""
    grams = {tuple(prompt_ids[i : i + n]) for i in range(len(prompt_ids) - n + 1)}
    copied = sum(tuple(reply[i - n + 1 : i + 1]) in grams for i in range(n - 1, len(reply)))
    return copied / len(reply) if reply else 0.0


def ceiling(prompt_ids: list[int], reply: list[int], cap: int, cost: DraftCost) -> float:
    """The speed-up an oracle would reach on this reply: each step drafts exactly the
    index's proposed tokens that will be accepted (none when that does not pay), at
    ``cost`` per verification step. What no draft-length policy can beat."""
    index = NgramIndex(DEFAULT.prompt_lookup_min, DEFAULT.prompt_lookup_max)
    tokens, position, steps = [*prompt_ids, *reply[:1]], 1, 0.0
    while position < len(reply):
        drafts = index.propose(tokens, min(cap, len(reply) - position - 1))
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == reply[position + accepted]:
            accepted += 1
        if accepted and (accepted + 1) / cost.steps(accepted) <= 1:
            accepted = 0
        steps += cost.steps(accepted)
        tokens += reply[position : position + accepted + 1]
        position += accepted + 1
    return (len(reply) - 1) / steps if steps else 1.0


def draft_costs(dtype: str) -> tuple[dict[int, DraftCost], torch.dtype]:
    """What the servers measure a verification step to cost at each draft cap (measured
    again here, the same way, on a model runner of this process), and the model's dtype."""
    loaded = load_model(ModelConfig(dtype=dtype))
    block_size = paged_attention.DEFAULT_BLOCK_SIZE
    tokens = draft_cost.CONTEXT_TOKENS + 1 + max(DRAFT_LENGTHS)
    runner = ModelRunner(loaded.model, -(-tokens // block_size), block_size)
    costs = {k: draft_cost.measure(runner, k, loaded.uses_mrope) for k in DRAFT_LENGTHS}
    return costs, loaded.dtype


def first_difference(first: list[int], second: list[int]) -> int:
    """The index of the first token where the two differ (or the shorter's length)."""
    return next(
        (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
        min(len(first), len(second)),
    )


def main() -> None:
    parser = _cli.parser(__doc__, with_dtype=True)
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="alternating runs, best kept")
    args = parser.parse_args()
    max_tokens = args.max_tokens or (64 if args.quick else 256)
    rounds = args.rounds or (1 if args.quick else 2)
    configurations: dict[str, tuple[str, ...]] = {"plain": ("--dtype", args.dtype)}
    for k in DRAFT_LENGTHS:
        configurations[f"K={k}"] = (
            *configurations["plain"],
            *("--speculative", "ngram", "--num-speculative-tokens", str(k)),
        )
    results: dict[str, dict[str, tuple[list[int], float, pb.Done]]] = {}
    with contextlib.ExitStack() as stack:
        # All servers up at once, used in turns: a slow moment of the machine hurts all.
        targets = {
            label: stack.enter_context(running_server(*flags))
            for label, flags in configurations.items()
        }
        workload_prompts = prompts(targets["plain"])
        for target in targets.values():
            decode(target, workload_prompts["chat"], 8)  # warm-up
        for name, prompt_ids in workload_prompts.items():
            for _ in range(rounds):
                for label, target in targets.items():
                    tokens, rate, done = decode(target, prompt_ids, max_tokens)
                    best = results.setdefault(name, {}).get(label)
                    if best is None or rate > best[1]:
                        results[name][label] = (tokens, rate, done)
                    print(f"[{label}] {name}: {len(tokens)} tokens at {rate:.1f} tok/s", flush=True)
    print()
    print(f"{'workload':<9} {'copied':>7} {'plain tok/s':>12}", end="")
    for k in DRAFT_LENGTHS:
        print(f" | K={k}: {'tok/s':>6} {'speed-up':>9} {'accepted':>9} {'ceiling':>8}", end="")
    print()
    costs, model_dtype = draft_costs(args.dtype)
    exact = model_dtype == torch.float32
    differ: list[str] = []
    for name, prompt_ids in workload_prompts.items():
        plain_tokens, plain_rate, _ = results[name]["plain"]
        copied = copied_fraction(prompt_ids, plain_tokens)
        print(f"{name:<9} {copied:>7.0%} {plain_rate:>12.1f}", end="")
        for k in DRAFT_LENGTHS:
            spec_tokens, spec_rate, done = results[name][f"K={k}"]
            if spec_tokens != plain_tokens:
                # In float32 a verification pass gives what single steps give; in 16-bit
                # its other shapes round differently, and a near-tie may flip.
                assert not exact, f"{name}: speculation changed the float32 greedy output"
                differ.append(
                    f"{name} K={k} from token {first_difference(plain_tokens, spec_tokens)}"
                )
            drafted, accepted = done.drafted_tokens, done.accepted_tokens
            acceptance = accepted / drafted if drafted else 0.0
            bound = ceiling(prompt_ids, plain_tokens, k, costs[k])
            print(
                f" | K={k}: {spec_rate:>6.1f} {spec_rate / plain_rate:>8.2f}x "
                f"{acceptance:>8.0%} {bound:>7.2f}x",
                end="",
            )
        print()
    print(
        "copied: the share of the reply's tokens that end a 6-gram of the prompt; "
        "accepted: of the drafted tokens; ceiling: an oracle choosing each step's draft "
        "length, at the draft cost measured here: "
        + ", ".join(f"K={k}: 1 + {c.switch:.2f} + {c.row:.2f} d" for k, c in costs.items())
    )
    if differ:
        print("greedy outputs differ (16-bit rounding of other shapes):", "; ".join(differ))
    else:
        print("greedy outputs identical with and without speculation")


if __name__ == "__main__":
    main()
