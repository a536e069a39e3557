"""Server and engine configuration: frozen dataclasses, checked on creation."""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field

MIN_KEEPALIVE_S = 1.0
ATTENTION_BACKENDS = ("auto", "sdpa", "flash-attn")
"""auto: flash-attn where it can run, else sdpa."""
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeError(argparse.ArgumentTypeError, ValueError):
    """A flag's size that does not parse (argparse shows its message)."""


def parse_bytes(text: str) -> int:
    """Parses a size such as ``2GiB``, ``512M``, ``1e9`` or ``1048576`` into bytes;
    argparse.ArgumentTypeError (a ValueError too) names what it takes."""
    number_pattern = r"\d+(?:\.\d+)?(?:e\d+)?"
    match = re.fullmatch(rf"\s*({number_pattern})\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise SizeError(f"not a size: {text!r} (try 2GiB, 512MiB or a number of bytes)")
    number, unit = match.groups()
    num_bytes = float(number) * _SIZE_UNITS[unit.upper()]
    if not math.isfinite(num_bytes):  # int() of it was an OverflowError's traceback
        raise SizeError(f"too large a size: {text!r} (try 2GiB, 512MiB or a number of bytes)")
    return int(num_bytes)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to know beyond the model itself."""

    max_context: int = 0
    """Tokens a session may hold; 0 means the model's own limit."""
    block_size: int = 0
    """Tokens per KV block; 0 picks 256 where flash-attn's paged kernel runs, else 16."""
    kv_cache_bytes: int = 0
    """Bytes of accelerator memory for the KV block pool; 0 picks a default (on CUDA,
    what ``gpu_memory_utilization`` leaves; on a CPU, 1 GiB)."""
    gpu_memory_utilization: float = 0.9
    """Of a GPU's total memory, the share the server may take (the model, the largest
    step's activations, the KV pool) where ``kv_cache_bytes`` is 0."""
    max_batch_tokens: int = 2048
    """Tokens one forward pass may carry (decodes plus prefill chunks)."""
    max_running: int = 64
    """Requests that may share one forward pass."""
    max_queue: int = 256
    """Requests that may wait for room; more fail with RESOURCE_EXHAUSTED."""
    session_ttl_s: float = 1800.0
    """Idle sessions older than this are closed; 0 disables expiry."""
    max_sessions: int = 16384
    """Sessions that may be open at once (forks included); more are refused with
    RESOURCE_EXHAUSTED, so that clients opening sessions without end cannot exhaust the
    host's memory before their TTL passes."""
    host_kv_bytes: int = 1 << 30
    """Bytes of host memory for offloaded KV and kept image embeddings; 0 disables
    offloading (and images)."""
    max_image_bytes: int = 20 << 20
    """Largest encoded image AppendImage accepts."""
    max_image_pixels: int = 4096 * 4096
    """Largest width * height AppendImage accepts (checked before decoding)."""
    attention_backend: str = "auto"
    """sdpa, flash-attn, or auto (flash-attn where it can run, else sdpa)."""
    max_logprobs: int = 20
    """Largest logprob_top_k a call may ask for."""
    max_ranges: int = 64
    """Most logprobs_ranges, and most readout_ranges, one call may carry."""
    max_stop_strings: int = 16
    """Most stop strings one call may carry."""
    max_stop_string_bytes: int = 256
    """Longest stop string, in UTF-8 bytes."""
    speculative: str = ""
    """Speculative decoding: "ngram" (drafts from the session's own history) or "" (off)."""
    num_speculative_tokens: int = 4
    """Draft tokens verified per decode step."""
    prompt_lookup_min: int = 2
    """Shortest n-gram whose earlier occurrence proposes drafts."""
    prompt_lookup_max: int = 4
    """Longest n-gram tried first."""
    speculative_cost: tuple[float, float] | None = None
    """(switch, row): a step verifying d > 0 drafts costs 1 + switch + row * d decode
    steps; it sets how many drafts pay off at a session's acceptance rate. None: the
    device's (0.6, 0.1) on CPU, (0, 0.05) on an accelerator; (0, 0) always drafts the
    most."""

    def __post_init__(self) -> None:
        if self.block_size < 0:
            raise ValueError("--block-size must not be negative (0 picks a default)")
        if self.max_batch_tokens <= 0 or self.max_running <= 0 or self.max_sessions <= 0:
            raise ValueError(
                "--max-batch-tokens, --max-running and --max-sessions must be positive"
            )
        if self.max_context < 0 or self.kv_cache_bytes < 0 or self.max_queue < 0:
            raise ValueError(
                "--max-context, --kv-cache-memory and --max-queue must not be negative"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must be above 0 and at most 1")
        limits = (
            self.max_logprobs,
            self.max_ranges,
            self.max_stop_strings,
            self.max_stop_string_bytes,
        )
        if min(limits) < 0:
            raise ValueError(
                "--max-logprobs, --max-ranges, --max-stop-strings and --max-stop-string-bytes "
                "must not be negative"
            )
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("--max-image-bytes and --max-image-pixels must be positive")
        if self.speculative not in ("", "ngram"):
            raise ValueError(f"unknown speculative method {self.speculative!r}; use ngram")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("--prompt-lookup-min and --prompt-lookup-max need 1 <= min <= max")
        if self.num_speculative_tokens < 1 or (
            self.speculative and self.num_speculative_tokens >= self.max_batch_tokens
        ):
            raise ValueError(
                "--num-speculative-tokens must be at least 1 and below --max-batch-tokens "
                "(a verification step carries them all)"
            )
        if self.speculative_cost is not None and not all(
            math.isfinite(cost) and cost >= 0 for cost in self.speculative_cost
        ):
            raise ValueError("--speculative-cost SWITCH,ROW must be finite and not negative")
        if not (self.session_ttl_s >= 0 and math.isfinite(self.session_ttl_s)):
            raise ValueError("--session-ttl must be 0 (no expiry) or a positive number")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; "
                f"choose one of {', '.join(ATTENTION_BACKENDS)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str | None = None
    """A Hugging Face model directory, a GGUF file, or None for the default model."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"unknown device {self.device!r}; choose cpu, cuda, cuda:N or auto")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServerConfig:
    """The whole server: where it listens and what it serves."""

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 0
    """Start the OpenAI shim beside the gRPC server on this port; 0 disables it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    readout_path: str | None = None
    """A safetensors readout file (see SPEC 2.3); None disables readout."""
    api_key: str | None = None
    """Bearer token every call must carry (health and reflection stay open); None: no auth."""
    allow_remote_images: bool = False
    """Let the shim fetch http(s) image URLs (only data: URLs otherwise)."""
    cors_origins: tuple[str, ...] = ()
    """Origins whose browser pages may call the shim (``ShimConfig.cors_origins``)."""
    max_message_bytes: int = 64 << 20
    """Largest gRPC message accepted or sent."""
    replica_id: str = ""
    """This server's name among replicas, sent as ``salience-replica`` initial metadata on
    every response (SPEC 2.7); empty: ``host:port`` once the port is bound."""
    grace_s: float = 30.0
    """On SIGTERM: how long calls in flight may run on before they end UNAVAILABLE."""
    stream_buffer_events: int = 1 << 16
    """Events one Generate stream may hold unread before it alone is cancelled."""
    keepalive_s: float = 30.0
    """Idle connections are pinged this often; a peer that does not answer is gone."""
    metrics_port: int = 0
    """Serve Prometheus metrics here (0: only at the shim's /metrics, if there is one)."""

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)} is out of range (0 to 65535)")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError("--grace-s must be finite and not negative")
        if not (math.isfinite(self.keepalive_s) and self.keepalive_s >= MIN_KEEPALIVE_S):
            # Pings every few milliseconds, each timing out as fast, failed every call.
            raise ValueError(f"--keepalive-s must be finite and at least {MIN_KEEPALIVE_S:g}")
        check_api_key(self.api_key)
        if self.readout_path is not None and not os.path.isfile(self.readout_path):
            # Checked before the model loads (and converts, the first time).
            raise ValueError(f"--readout {self.readout_path!r}: no such file")
        if self.stream_buffer_events <= 0:
            raise ValueError("--stream-buffer-events must be positive")
        check_cors_origins(self.cors_origins)


_ORIGIN = re.compile(r"\A[a-z][a-z0-9+.-]*://[^/\s*A-Z]+\Z")
"""An origin as a browser's ``Origin`` header carries it: scheme and host in lower case,
no path, no wildcard (origins are compared as they are)."""


def check_api_key(api_key: str | None) -> None:
    """The bearer token travels in HTTP headers and gRPC metadata, which carry visible
    ASCII only: another key started a server no call could reach (each INTERNAL)."""
    if api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", api_key):
        raise ValueError(
            "--api-key (or $SALIENCE_API_KEY) must be visible ASCII characters, no spaces: "
            "it travels in HTTP headers and gRPC metadata"
        )


def check_cors_origins(origins: tuple[str, ...]) -> None:
    """ValueError for an origin no browser sends (so that it would match nothing)."""
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ValueError(
                f"CORS origin {origin!r} is not * or scheme://host[:port] as a browser "
                "sends it (lower case, no path, no wildcard)"
            )


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Ends each option's help with its default, where it has one its help does not
    already name (operators read ``--help``, not the README)."""
    for action in parser._actions:
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if not action.option_strings or unset:
            continue
        if "default" in (action.help or "") or action.dest == "api_key":  # never shown
            continue
        if action.type is parse_bytes:
            default = _bytes_text(default)
        action.help = (
            f"{action.help} (default: {default})" if action.help else f"default: {default}"
        )


def _bytes_text(num_bytes: int) -> str:
    """``num_bytes`` as ``parse_bytes`` reads it back, in the largest unit that divides it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes and num_bytes % (1 << shift) == 0:
            return f"{num_bytes >> shift}{unit}"
    return str(num_bytes)


def add_cors_argument(parser: argparse.ArgumentParser) -> None:
    """``--cors-origin``, which the server (for the shim beside it) and the shim take
    (here, not in the shim's package, whose import takes half a second: the server must
    reach its signal handlers at once)."""
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (https://host[:port], or * for any) call the "
        "HTTP API (CORS); repeatable; default: none",
    )
