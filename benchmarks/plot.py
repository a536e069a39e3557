"""PNG plots of a ``benchmarks.peers`` run, from its JSON:

- ``agent_turn_latency.png``: per-turn latency (p50, p95 dashed) against turn number,
  one line per server;
- ``throughput_concurrency.png``: output tokens per second against how many
  independent requests run at once (1, 2, 4, 8, 16);
- ``ttft_history.png``: time to first token against history length, for a session
  (Salience over gRPC, appending each turn) and for stateless resending (a fresh
  Salience session given the whole history, and every server through the openai SDK).

    python -m benchmarks.plot                       # docs/benchmarks/peers.json
    python -m benchmarks.plot RUN.json --out DIR    # PNGs into DIR (default: beside RUN.json)

Needs matplotlib (in the dev tools, or ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_RUN = Path("docs/benchmarks/peers.json")
NAMES = {
    "salience-grpc": "Salience gRPC",
    "salience-http": "Salience OpenAI shim",
    "transformers": "transformers serve --continuous-batching",
    "llama-cpp": "llama-cpp-python server",
}
LABELS = {
    "salience-grpc": "Salience gRPC (session: appends each turn)",
    "salience-grpc-resend": "Salience gRPC (fresh session, history resent)",
    "salience-http": "Salience OpenAI shim (history resent; prefix reused)",
    "transformers": "transformers serve --continuous-batching (history resent)",
    "llama-cpp": "llama-cpp-python server (history resent)",
}


def workload(run: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Each flavour's result of workload ``name``, where it ran."""
    found = {}
    for flavour, result in run["flavours"].items():
        entry = result.get("workloads", {}).get(name)
        if entry is not None and entry.get("status") == "ok":
            found[flavour] = entry
    return found


def subtitle(run: dict[str, Any]) -> str:
    machine = run["machine"]
    quick = ", --quick shapes" if run.get("quick") else ""
    return (
        f"{run['model']['id']}, {machine['cpu']} ({machine['cores']} cores){quick}, {run['taken']}"
    )


def plot_turn_latency(run: dict[str, Any], axes: Any) -> None:
    for flavour, entry in workload(run, "agent").items():
        turns = [row["turn"] for row in entry["by_turn"]]
        (line,) = axes.plot(
            turns,
            [row["latency_p50_s"] for row in entry["by_turn"]],
            marker="o",
            label=LABELS.get(flavour, flavour),
        )
        axes.plot(
            turns,
            [row["latency_p95_s"] for row in entry["by_turn"]],
            linestyle="--",
            color=line.get_color(),
        )
    sizes = run["sizes"]
    axes.set_title(
        f"Agent: {sizes['num_conversations']} conversations at once, {sizes['turn_decode_tokens']} tokens a turn"
    )
    axes.set_xlabel("turn")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel("turn latency, s (p50; p95 dashed)")


def plot_throughput(run: dict[str, Any], axes: Any) -> None:
    levels: list[int] = []
    for flavour, entry in workload(run, "throughput").items():
        levels = [row["concurrency"] for row in entry["levels"]]
        rates = [row["output_tok_s"] for row in entry["levels"]]
        axes.plot(levels, rates, marker="o", label=NAMES.get(flavour, flavour))
    sizes = run["sizes"]
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(level) for level in levels])
    axes.minorticks_off()
    axes.set_title(
        f"Throughput: {sizes['throughput_prompt_tokens']}-token prompts, "
        f"{sizes['throughput_decode_tokens']} tokens decoded each"
    )
    axes.set_xlabel("requests at once (sessions)")
    axes.set_ylabel("output tokens / s")


def plot_ttft_history(run: dict[str, Any], axes: Any) -> None:
    for flavour, entry in workload(run, "agent").items():
        (line,) = axes.plot(
            [row["history_tokens"] for row in entry["by_turn"]],
            [row["ttft_p50_s"] for row in entry["by_turn"]],
            marker="o",
            label=LABELS.get(flavour, flavour),
        )
        turns = entry["turns"]
        axes.scatter(
            [t["history_tokens"] for t in turns],
            [t["ttft_s"] for t in turns],
            s=6,
            alpha=0.25,
            color=line.get_color(),
        )
    axes.set_title("Time to first token as the conversation grows (p50 line; each turn a dot)")
    axes.set_xlabel("history length, tokens")
    axes.set_ylabel("time to first token, s")


PLOTS = {
    "agent_turn_latency.png": plot_turn_latency,
    "throughput_concurrency.png": plot_throughput,
    "ttft_history.png": plot_ttft_history,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.plot", description="PNGs from a peers.py run")
    parser.add_argument(
        "run", type=Path, nargs="?", default=DEFAULT_RUN, help="the JSON peers.py wrote"
    )
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: beside the JSON)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        parser.error("needs matplotlib: pip install -e '.[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(args.run.read_text())
    out = args.out or args.run.parent
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS.items():
        figure, axes = plt.subplots(figsize=(9, 5.5))
        draw(run, axes)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
        figure.suptitle(subtitle(run), fontsize=8, y=0.01, va="bottom")
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        print(out / name)


if __name__ == "__main__":
    main()
