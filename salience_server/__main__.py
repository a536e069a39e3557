"""``salience-server`` / ``python -m salience_server``: the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from salience_server.config import (
    ATTENTION_BACKENDS,
    EngineConfig,
    ModelConfig,
    ServerConfig,
    add_cors_argument,
    parse_bytes,
    show_defaults,
)
from salience_server.stop_signals import exit_at_once_on_stop_signals, exit_now


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="salience-server", description="Salience: a session-based LLM inference server."
    )
    parser.add_argument(
        "--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=0, help="also serve the OpenAI shim here")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--max-context", type=int, default=0, help="per-session token limit (0: the model's)"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=0,
        help="tokens per KV block (default: 256 with flash-attn's paged kernel, else 16)",
    )
    parser.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="auto: flash-attn on CUDA when installed (paged with --block-size 256), else SDPA",
    )
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=0,
        help="KV pool size, e.g. 2GiB (default, or 0: 1GiB on CPU; on CUDA what "
        "--gpu-memory-utilization leaves)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of the GPU's memory the server may use: the model, the largest step's "
        "activations (measured at start) and, in what is left, the KV pool",
    )
    parser.add_argument(
        "--host-kv-memory",
        type=parse_bytes,
        default=parse_bytes("1GiB"),
        help="host memory for offloaded KV of evicted sessions and kept image embeddings "
        "(0: drop and recompute, no images)",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--session-ttl", type=float, default=1800.0, help="seconds; 0 disables")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=16384,
        help="sessions open at once, forks included (more: RESOURCE_EXHAUSTED)",
    )
    parser.add_argument("--max-image-bytes", type=parse_bytes, default=20 << 20)
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--readout", help="readout safetensors file (SPEC 2.3)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SALIENCE_API_KEY") or None,
        help="require 'authorization: Bearer KEY' on every call (default: $SALIENCE_API_KEY)",
    )
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="let the shim fetch http(s) images"
    )
    add_cors_argument(parser)
    parser.add_argument(
        "--replica-id",
        default="",
        help="this replica's name in the salience-replica response metadata (default: host:port)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, SIGINT or SIGHUP, how long calls in flight may run on (default 30)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics here (with --http-port they are also at its /metrics)",
    )
    parser.add_argument(
        "--stream-buffer-events",
        type=int,
        default=1 << 16,
        help="events a stream may hold unread before it alone is cancelled",
    )
    parser.add_argument(
        "--keepalive-s", type=float, default=30.0, help="ping idle client connections this often"
    )
    parser.add_argument("--max-logprobs", type=int, default=20, help="largest logprob_top_k")
    parser.add_argument("--max-ranges", type=int, default=64, help="ranges of each kind per call")
    parser.add_argument("--max-stop-strings", type=int, default=16)
    parser.add_argument("--max-stop-string-bytes", type=int, default=256)
    parser.add_argument(
        "--speculative",
        choices=("ngram",),
        default=None,
        help="speculative decoding: ngram drafts tokens from the session's own history",
    )
    parser.add_argument(
        "--num-speculative-tokens", type=int, default=4, help="drafts verified per step"
    )
    parser.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram")
    parser.add_argument(
        "--speculative-cost",
        type=_two_floats,
        default=None,
        help="SWITCH,ROW: a step verifying d drafts costs 1 + SWITCH + ROW*d decode steps "
        "(default: measured at start-up by timing forward passes of 1, 2 and 1 + K rows; "
        "0,0 always drafts the most)",
    )
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    show_defaults(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.speculative is None:
        given = [
            dest for dest in SPECULATION_DESTS if getattr(args, dest) != parser.get_default(dest)
        ]
        unused = ["--" + dest.replace("_", "-") for dest in given]
        if unused:
            logging.getLogger("salience").warning(
                "%s take%s effect only with --speculative ngram",
                ", ".join(unused),
                "s" if len(unused) == 1 else "",
            )
    try:
        return ServerConfig(
            host=args.host,
            port=args.port,
            http_port=args.http_port,
            model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device),
            engine=EngineConfig(
                max_context=args.max_context,
                block_size=args.block_size,
                attention_backend=args.attention_backend,
                kv_cache_bytes=args.kv_cache_memory,
                gpu_memory_utilization=args.gpu_memory_utilization,
                host_kv_bytes=args.host_kv_memory,
                max_image_bytes=args.max_image_bytes,
                max_image_pixels=args.max_image_pixels,
                max_batch_tokens=args.max_batch_tokens,
                max_running=args.max_running,
                max_queue=args.max_queue,
                session_ttl_s=args.session_ttl,
                max_sessions=args.max_sessions,
                max_logprobs=args.max_logprobs,
                max_ranges=args.max_ranges,
                max_stop_strings=args.max_stop_strings,
                max_stop_string_bytes=args.max_stop_string_bytes,
                speculative=args.speculative or "",
                num_speculative_tokens=args.num_speculative_tokens,
                prompt_lookup_min=args.prompt_lookup_min,
                prompt_lookup_max=args.prompt_lookup_max,
                speculative_cost=args.speculative_cost,
            ),
            grace_s=args.grace_s,
            metrics_port=args.metrics_port,
            stream_buffer_events=args.stream_buffer_events,
            keepalive_s=args.keepalive_s,
            readout_path=args.readout,
            allow_remote_images=args.allow_remote_images,
            cors_origins=tuple(args.cors_origin),
            api_key=args.api_key,
            replica_id=args.replica_id,
        )
    except ValueError as error:
        parser.error(str(error))
        raise


SPECULATION_DESTS = (
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "speculative_cost",
)
"""Flags that shape speculative decoding, which do nothing without ``--speculative``."""


def _two_floats(text: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not two numbers SWITCH,ROW: {text!r}") from None
    return first, second


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    exit_at_once_on_stop_signals("stopping before the server started")
    from salience_server.rpc.server import serve

    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, ValueError, OSError) as error:
        logging.getLogger("salience").error("%s", error)
        sys.exit(1)
    # The interpreter's clean-up is skipped: after a stop during loading, the model's
    # loading thread is still inside torch; after a drain there is nothing left to
    # clean, and the clean-up gave the signals back to the system's defaults, so that
    # another Ctrl-C then killed the process (exit -2).
    exit_now()


if __name__ == "__main__":
    main()
