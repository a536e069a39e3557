"""``salience-shim`` / ``python -m salience_server.http``: the OpenAI shim alone, a gRPC
client of a Salience server given by its address."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from salience_client import DEFAULT_TARGET
from salience_server import stop_signals
from salience_server.config import add_cors_argument, parse_bytes, show_defaults
from salience_server.http.config import ShimConfig, api_key_from_env
from salience_server.http.serving import ShimServer

log = logging.getLogger("salience.shim")


def parse_args(argv: list[str] | None = None) -> ShimConfig:
    """The command line as a ShimConfig (exits with usage on a bad value)."""
    parser = argparse.ArgumentParser(
        prog="salience-shim",
        description="An OpenAI-compatible HTTP server in front of a Salience gRPC server.",
    )
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the gRPC server, HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=api_key_from_env(),
        help="require this bearer token ($SALIENCE_API_KEY)",
    )
    parser.add_argument(
        "--served-model-name", action="append", default=[], help="another name for the model"
    )
    parser.add_argument("--max-pooled-sessions", type=int, default=32)
    parser.add_argument("--max-stored-responses", type=int, default=1024)
    parser.add_argument(
        "--max-stored-image-bytes",
        type=parse_bytes,
        default=parse_bytes("256MiB"),
        help="bytes of images the stored responses may keep (older responses go first)",
    )
    parser.add_argument(
        "--max-stored-tokens",
        type=int,
        default=4 << 20,
        help="token ids the stored responses may keep, each its whole conversation's "
        "(older responses go first; about 36 bytes each)",
    )
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs"
    )
    add_cors_argument(parser)
    parser.add_argument(
        "--keepalive-s",
        type=float,
        default=15.0,
        help="seconds of silence after which a stream sends an SSE keep-alive comment (0: off)",
    )
    parser.add_argument(
        "--no-replay",
        action="store_true",
        help="do not re-create sessions lost with their replica nor resume broken streams",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, SIGINT or SIGHUP, seconds open requests may run on before they are "
        "ended (a stream with an error event)",
    )
    parser.add_argument(
        "--log-level", default="info", type=str.lower, choices=("debug", "info", "warning", "error")
    )
    show_defaults(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return ShimConfig(
            allow_remote_images=args.allow_remote_images,
            cors_origins=tuple(args.cors_origin),
            target=args.target,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            served_model_names=tuple(args.served_model_name),
            max_pooled_sessions=args.max_pooled_sessions,
            max_stored_responses=args.max_stored_responses,
            max_stored_image_bytes=args.max_stored_image_bytes,
            max_stored_tokens=args.max_stored_tokens,
            keepalive_s=args.keepalive_s,
            grace_s=args.grace_s,
            log_level=args.log_level,
            replay=not args.no_replay,
        )
    except ValueError as error:
        parser.error(str(error))
        raise


def main(argv: list[str] | None = None) -> None:
    """``salience-shim``: serves until SIGTERM, SIGINT or SIGHUP."""
    config = parse_args(argv)
    stop_signals.exit_at_once_on_stop_signals()
    try:
        server = ShimServer(config)
    except OSError as error:
        log.error("%s", error)
        sys.exit(1)
    log.info("OpenAI shim for %s on http://%s:%d/v1", config.target, config.host, server.port)
    asyncio.run(_serve(server))
    log.info("stopped")
    stop_signals.exit_now()  # the interpreter's clean-up gave the signals back to the system


async def _serve(server: ShimServer) -> None:
    """Serves until SIGTERM, SIGINT or SIGHUP, then stops gracefully: open requests may
    finish within the grace. A second signal ends the process at once."""

    def on_stop_signal() -> None:
        if server.server.should_exit:
            log.info("stopping at once")
            stop_signals.exit_now()
        server.request_stop()

    with stop_signals.handled_in(asyncio.get_running_loop(), on_stop_signal):
        await server.serve()


if __name__ == "__main__":
    main()
