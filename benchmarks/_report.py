"""Figures from raw timings, progress lines, and the tables peers.py prints."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

PROGRESS_INTERVAL_S = 5.0


@dataclass
class Turn:
    """One agent turn as the client saw it."""

    conversation: int
    turn: int
    """1-based."""
    history_tokens: int
    """Prompt tokens of this turn: the whole conversation so far, rendered."""
    ttft_s: float
    """Request sent to the first streamed token of text."""
    latency_s: float
    """Request sent to the end of the stream."""
    completion_tokens: int


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def by_turn(turns: list[Turn]) -> list[dict[str, float]]:
    """p50 and p95 of latency and time to first token for each turn number, across
    conversations, with the mean history length at that turn."""
    summary = []
    for number in sorted({t.turn for t in turns}):
        same = [t for t in turns if t.turn == number]
        latencies, ttfts = [t.latency_s for t in same], [t.ttft_s for t in same]
        summary.append(
            {
                "turn": number,
                "history_tokens": statistics.fmean(t.history_tokens for t in same),
                "completion_tokens": statistics.fmean(t.completion_tokens for t in same),
                "latency_p50_s": percentile(latencies, 0.5),
                "latency_p95_s": percentile(latencies, 0.95),
                "ttft_p50_s": percentile(ttfts, 0.5),
                "ttft_p95_s": percentile(ttfts, 0.95),
            }
        )
    return summary


def unsupported(reason: str) -> dict[str, Any]:
    """A workload the server cannot run at all: reported, never given a number."""
    return {"status": "unsupported", "reason": reason}


class Progress:
    """'[server] workload: done/total unit' on stderr, every few seconds and at the end."""

    def __init__(self, server: str, workload: str, total: int, unit: str) -> None:
        self.prefix = f"[{server}] {workload}"
        self.total, self.unit, self.done = total, unit, 0
        self._start = self._last = time.monotonic()
        self._print()

    def step(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self._print()

    def _print(self) -> None:
        elapsed = time.monotonic() - self._start
        print(
            f"{self.prefix}: {self.done}/{self.total} {self.unit} ({elapsed:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


@dataclass(frozen=True)
class Metric:
    """The headline figure of one workload."""

    workload: str
    key: str
    label: str
    higher_is_better: bool


METRICS = (
    Metric("agent", "total_s", "agent: total time, s", False),
    Metric("throughput", "output_tok_s", "throughput: output tok/s", True),
    Metric("scoring", "scored_tok_s", "scoring: scored tok/s", True),
    Metric("prefix", "rest_median_s", "prefix reuse: later request, s", False),
)


def headline(result: dict[str, Any], workload: str) -> float | str:
    """The figure of ``workload`` in one flavour's result, or why there is none."""
    metric = next(m for m in METRICS if m.workload == workload)
    entry = result.get("workloads", {}).get(workload)
    if result.get("status") != "ok":
        return str(result.get("status", "not run"))
    if entry is None:
        return "-"
    if entry.get("status") != "ok":
        return "cannot" if entry.get("status") == "unsupported" else "failed"
    return float(entry[metric.key])


def _cell(value: float | str) -> str:
    return f"{value:.3g}" if isinstance(value, float) else value


def figures_table(flavours: dict[str, dict[str, Any]]) -> str:
    """Raw headline figures: one row per workload, one column per server flavour."""
    names = list(flavours)
    rows = [["workload", *names]]
    for metric in METRICS:
        arrow = "higher" if metric.higher_is_better else "lower"
        label = f"{metric.label} ({arrow} is better)"
        rows.append([label, *(_cell(headline(flavours[n], metric.workload)) for n in names)])
    return _format(rows)


def ratio_rows(
    flavours: dict[str, dict[str, Any]], ours: tuple[str, ...], peers: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Salience ÷ peer of each workload's headline figure, for each Salience route that
    ran it. ``faster`` says whether the ratio favours Salience."""
    rows = []
    for metric in METRICS:
        for route in ours:
            mine = headline(flavours.get(route, {}), metric.workload)
            if not isinstance(mine, float):
                continue
            for peer in peers:
                theirs = headline(flavours.get(peer, {}), metric.workload)
                row: dict[str, Any] = {"workload": metric.workload, "salience": route, "peer": peer}
                if isinstance(theirs, float) and theirs > 0:
                    ratio = mine / theirs
                    row["ratio"] = ratio
                    row["salience_better"] = (ratio > 1) == metric.higher_is_better
                else:
                    row["ratio"] = None
                    row["why"] = theirs
                rows.append(row)
    return rows


def ratio_table(rows: list[dict[str, Any]], peers: tuple[str, ...]) -> str:
    """The ratio table: a row per (workload, Salience route), a column per peer."""
    table = [["Salience ÷ peer", *peers]]
    for workload, route in dict.fromkeys((r["workload"], r["salience"]) for r in rows):
        metric = next(m for m in METRICS if m.workload == workload)
        cells = {
            r["peer"]: _ratio_cell(r)
            for r in rows
            if (r["workload"], r["salience"]) == (workload, route)
        }
        table.append([f"{metric.label} [{route}]", *(cells.get(peer, "-") for peer in peers)])
    return _format(table)


def _ratio_cell(row: dict[str, Any]) -> str:
    if row["ratio"] is None:
        return str(row["why"])
    verdict = "Salience better" if row["salience_better"] else "Salience worse"
    return f"{row['ratio']:.2f} ({verdict})"


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
