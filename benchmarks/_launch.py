"""Starts each server of the peer benchmark on loopback and stops it by its own PID.

Three servers, one model: Salience (gRPC, and its OpenAI shim through ``--http-port``),
``transformers serve --continuous-batching`` on the same converted safetensors
directory, and llama-cpp-python's OpenAI server on the GGUF that directory came from.
Each gets the same KV memory budget. Nothing here reaches a model hub: transformers
runs with ``HF_HUB_OFFLINE=1`` on a local path.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx

from benchmarks._server import free_port

LLAMA_INSTALL = (
    "pip install -e '.[llama]' (builds llama.cpp from source, about 15 minutes on 2 cores)"
)
TRANSFORMERS_INSTALL = "pip install 'transformers[serving]'"
STOP_WAIT_S = 20.0
LLAMA_CONTEXT = 4096
"""llama.cpp allocates its context up front; the longest prompt here is about 1,700 tokens."""
TRANSFORMERS_PAGE_TOKENS = 256
"""transformers' continuous batching pages (its ``page_size`` default). Its pool must be
sized: by default it takes 60% of free host memory on CPU, and its attention masks grow
with the pool ([batch tokens, pool tokens]), past the memory of this machine."""


@dataclass(frozen=True)
class ModelFiles:
    """The one model every server gets."""

    model_id: str
    directory: Path
    """Safetensors directory: Salience and transformers load this."""
    gguf: Path | None
    """The GGUF the directory was converted from (llama.cpp loads it); None for a directory."""
    kv_bytes_per_token: int
    """Keys and values of one token, all layers, in the budget's dtype (to size pools)."""


@dataclass(frozen=True)
class Budget:
    """What every server is given alike."""

    kv_cache_tokens: int
    """Tokens of KV each server may hold: Salience's pool in bytes, transformers' pages."""
    device: str
    """``cpu`` or ``cuda``."""
    dtype: str
    """Salience's default for the device: float32 on CPU, bfloat16 on CUDA."""


@dataclass
class Launch:
    """How to start one server, or why it cannot start here."""

    name: str
    label: str
    command: list[str] = field(default_factory=list)
    http_port: int = 0
    grpc_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    unavailable: str = ""
    """Empty when it can start; else what is missing and how to get it."""
    version: str = ""


@dataclass
class Running:
    """A started server: its OpenAI base URL, model name, and gRPC target if any."""

    launch: Launch
    pid: int
    base_url: str
    model: str
    grpc_target: str | None
    start_s: float


def salience(files: ModelFiles, budget: Budget) -> Launch:
    """Salience with its shim beside it: gRPC on one port, HTTP on another."""
    grpc_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "salience_server", "--model", str(files.directory)]
    command += ["--port", str(grpc_port), "--http-port", str(http_port)]
    pool_bytes = budget.kv_cache_tokens * files.kv_bytes_per_token
    command += ["--kv-cache-memory", str(pool_bytes), "--dtype", budget.dtype]
    command += ["--grace-s", "1", "--log-level", "WARNING"]
    return Launch(
        "salience", "Salience", command, http_port, grpc_port, version=version("salience")
    )


def transformers_serve(files: ModelFiles, budget: Budget) -> Launch:
    """``transformers serve`` with continuous batching, pinned to the local directory."""
    import transformers
    from transformers.utils.import_utils import is_serve_available

    launch = Launch("transformers", "transformers serve", version=transformers.__version__)
    if not is_serve_available():
        launch.unavailable = f"not installed: {TRANSFORMERS_INSTALL}"
        return launch
    num_pages = budget.kv_cache_tokens // TRANSFORMERS_PAGE_TOKENS
    launch.http_port = free_port()
    entry = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    launch.command = [sys.executable, "-c", entry, "serve", str(files.directory)]
    launch.command += ["--continuous-batching", "--cb-num-blocks", str(num_pages)]
    launch.command += ["--device", budget.device, "--dtype", budget.dtype]
    launch.command += ["--host", "127.0.0.1", "--port", str(launch.http_port)]
    launch.env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return launch


def llama_cpp(files: ModelFiles, budget: Budget, python: str, logits_all: bool = True) -> Launch:
    """llama-cpp-python's server on the GGUF, every core, and requests queued rather than
    cut short: by default a new request interrupts the one streaming
    (``interrupt_requests``). ``logits_all`` keeps the logits of every position, which
    echo + logprobs needs and every prompt token then pays the output head for."""
    launch = Launch("llama-cpp", "llama-cpp-python")
    probe = "import llama_cpp, llama_cpp.server; print(llama_cpp.__version__)"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if found.returncode != 0:
        launch.unavailable = f"not installed: {LLAMA_INSTALL}"
        return launch
    if files.gguf is None:
        launch.unavailable = "no GGUF of this model (give --model a .gguf file)"
        return launch
    launch.version = found.stdout.strip()
    launch.http_port = free_port()
    threads = str(os.cpu_count() or 1)
    launch.command = [python, "-m", "llama_cpp.server", "--model", str(files.gguf)]
    launch.command += ["--host", "127.0.0.1", "--port", str(launch.http_port)]
    launch.command += ["--n_ctx", str(LLAMA_CONTEXT), "--n_threads", threads]
    launch.command += ["--n_threads_batch", threads, "--logits_all", str(logits_all).lower()]
    launch.command += ["--interrupt_requests", "false", "--verbose", "false"]
    if budget.device == "cuda":
        launch.command += ["--n_gpu_layers", "-1"]
    return launch


@contextlib.contextmanager
def started(launch: Launch, log_path: Path, timeout_s: float) -> Iterator[Running]:
    """Starts ``launch``; yields once its ``/v1/models`` answers; always stops it by PID."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            launch.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **launch.env},
        )
        try:
            base_url = f"http://127.0.0.1:{launch.http_port}/v1"
            model = _wait_ready(process, base_url, log_path, timeout_s)
            grpc_target = f"127.0.0.1:{launch.grpc_port}" if launch.grpc_port else None
            elapsed = time.perf_counter() - start
            yield Running(launch, process.pid, base_url, model, grpc_target, elapsed)
        except Exception as error:
            if process.poll() is not None:  # the server died under the workload
                code = process.returncode
                error.add_note(f"{launch.name} exited (code {code}); its log:\n{tail(log_path)}")
            raise
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to this PID; SIGKILL if it has not exited after STOP_WAIT_S."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout_s: float
) -> str:
    """The served model's name, once ``/v1/models`` lists it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"exited during start-up (code {process.returncode}):\n{tail(log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            response = httpx.get(f"{base_url}/models", timeout=2)
            if response.status_code == 200:
                return str(response.json()["data"][0]["id"])
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout_s:.0f} s:\n{tail(log_path)}")


def tail(path: Path, num_lines: int = 15) -> str:
    """The last lines of a server's log, to say why it failed."""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-num_lines:])
