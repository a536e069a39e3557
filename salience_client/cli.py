"""``salience``: a command line for people: chat, score, info, sessions."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc

from salience_client.cli_notices import LineTracking, Notices
from salience_client.client import DEFAULT_TARGET, SalienceClient
from salience_client.generation import END
from salience_client.session import Session
from salience_client.types import Done, SalienceClientError, TokenEvent

_EXIT_COMMANDS = {"/exit", "/quit"}


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class ChatSession:
    """One conversation kept in one server session; each turn sends only new tokens."""

    def __init__(self, client: SalienceClient, session: Session, system: str | None) -> None:
        self.client = client
        self.session = session
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system}] if system else []
        )
        self.committed_ids: list[int] = []
        """What this client believes the session holds."""

    def turn(self, user_text: str, out: TextIO | LineTracking, **options: Any) -> Done:
        """Adds the user's message, streams the reply to ``out``; returns its Done."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        prompt_ids = self.client.tokenize_chat(messages, add_generation_prompt=True)
        # Re-rendering the conversation may tokenize the last reply differently from how
        # it was sampled: keep the shared prefix, rewind to it, send the rest.
        shared = common_prefix_length(self.committed_ids, prompt_ids)
        truncate_to = shared if shared < self.session.length else None
        reply_ids: list[int] = []
        reply_text: list[str] = []
        done = None
        events = self.session.generate(prompt_ids[shared:], truncate_to=truncate_to, **options)
        try:
            with contextlib.closing(events):
                for event in events:
                    if isinstance(event, Done):
                        done = event
                    elif not event.is_prefill:
                        reply_ids.append(event.token_id)
                        reply_text.append(event.text)
                        out.write(event.text)
                        out.flush()
        finally:
            out.write("\n")
            if done is None:  # failed or interrupted: only the shared prefix is certain
                self.committed_ids = self.committed_ids[: min(shared, self.session.length)]
        assert done is not None
        self.committed_ids = prompt_ids + reply_ids
        self.messages = [*messages, {"role": "assistant", "content": "".join(reply_text)}]
        return done


def chat(client: SalienceClient, args: argparse.Namespace) -> None:
    """The interactive REPL: one session across turns, replies streamed as they decode."""
    options: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        options["seed"] = args.seed
    is_interactive = sys.stdin.isatty()
    replies = LineTracking(sys.stdout)
    notices = Notices(replies, sys.stderr)
    client_log = logging.getLogger("salience_client")
    client_log.addHandler(notices)
    client_log.propagate = False
    failed = 0
    with client.open_session() as session:
        conversation = ChatSession(client, session, args.system)
        while True:
            if is_interactive:
                print("> ", end="", flush=True)
            line = read_message(sys.stdin, is_interactive)
            if line is None and is_interactive:
                print()  # end the prompt's line on Ctrl-D
            if line is None or line.strip() in _EXIT_COMMANDS:
                break
            if not line.strip():
                continue
            if not is_utf8(line):
                print("salience: the line is not valid UTF-8; nothing sent", file=sys.stderr)
                failed += 1
                continue
            try:
                done = conversation.turn(line.rstrip("\n"), replies, **options)
            except KeyboardInterrupt:
                print("[interrupted]", file=sys.stderr)
                continue
            except SalienceClientError as error:
                print(f"salience: {describe(error, args.target)}", file=sys.stderr)
                failed += 1
                continue
            if done.finish_reason in ("length", "context"):
                print(f"[stopped: {done.finish_reason}]", file=sys.stderr)
    if failed:  # a script feeding turns learns that some got no reply
        sys.exit(1)


def read_message(lines: TextIO, is_interactive: bool) -> str | None:
    """The next message: a line, or lines joined while each ends with a backslash (the
    backslash goes, the line break stays), as a shell continues a command; None at the
    end of the input."""
    parts: list[str] = []
    while True:
        line = lines.readline()
        if not line:
            return "".join(parts) if parts else None
        text = line.rstrip("\r\n")
        if not text.endswith("\\"):
            return "".join(parts) + line
        parts.append(text[:-1] + "\n")
        if is_interactive:
            print("... ", end="", flush=True)


def is_utf8(text: str) -> bool:
    """Whether ``text`` came from valid UTF-8: Python reads other bytes of the command
    line and of standard input as lone surrogates, which no request can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_token_ids(text: str) -> list[int]:
    """``"1,2 3"`` -> ``[1, 2, 3]``."""
    try:
        token_ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        token_ids = [-1]
    if not all(0 <= token_id <= END for token_id in token_ids):
        raise SystemExit(f"salience: --tokens takes token ids (integers >= 0), got {text!r}")
    return token_ids


def score(client: SalienceClient, args: argparse.Namespace) -> None:
    """Prints each token's logprob given the tokens before it, and the total."""
    if args.tokens is not None and args.text is not None:
        raise SystemExit("salience: score takes TEXT or --tokens, not both")
    if args.tokens is not None and args.add_special_tokens:
        raise SystemExit("salience: --add-special-tokens is for TEXT, not --tokens")
    if args.tokens is not None:
        token_ids = parse_token_ids(args.tokens)
    elif args.text is not None:
        text = sys.stdin.read() if args.text == "-" else args.text
        if not is_utf8(text):
            raise SystemExit("salience: the text to score is not valid UTF-8")
        token_ids = client.tokenize(text, add_special_tokens=args.add_special_tokens)
    else:
        raise SystemExit("salience: score needs TEXT (- for standard input) or --tokens")
    if not token_ids:
        raise SystemExit("salience: nothing to score (no tokens)")
    with client.open_session() as session:
        events = session.generate(
            token_ids, max_tokens=0, logprobs_ranges=[(0, END)], return_text=False
        )
        scored = [e for e in events if isinstance(e, TokenEvent)]
    print(f"{'pos':>5}  {'id':>7}  {'token':<20}  {'logprob':>10}  {'rank':>5}")
    # Each token's own bytes, in one call: a piece of a UTF-8 character prints as \xNN.
    pieces = client.token_bytes([event.token_id for event in scored])
    for event, raw in zip(scored, pieces, strict=True):
        piece = repr(raw.decode("utf-8", errors="backslashreplace")).replace("\\\\x", "\\x")
        if event.position == 0:  # no context: nothing to condition on
            print(f"{0:>5}  {event.token_id:>7}  {piece:<20}  {'-':>10}  {'-':>5}")
        else:
            print(
                f"{event.position:>5}  {event.token_id:>7}  {piece:<20}  "
                f"{event.logprob:>10.4f}  {event.rank:>5}"
            )
    conditioned = [e.logprob for e in scored if e.position > 0]
    total = sum(conditioned)
    mean = total / len(conditioned) if conditioned else 0.0
    print(f"total logprob: {total:.4f} over {len(conditioned)} tokens (mean {mean:.4f})")


def info(client: SalienceClient, args: argparse.Namespace) -> None:
    """Prints the served model's description."""
    model = client.model_info()
    rows = [
        ("model", model.model_id),
        ("vocab size", model.vocab_size),
        ("max context", model.max_context),
        ("dtype", model.dtype),
        ("device", model.device),
        ("eos token ids", ", ".join(map(str, model.eos_token_ids)) or "-"),
        ("bos token id", model.bos_token_id if model.bos_token_id is not None else "-"),
        ("chat template", "yes" if model.chat_template else "no"),
        ("images", "yes" if model.supports_images else "no"),
        ("readout", "yes" if model.supports_readout else "no"),
    ]
    if model.supports_readout:
        rows.append(("readout layers", ", ".join(map(str, model.readout_layers))))
        rows.append(("readout concepts", ", ".join(model.readout_concepts)))
    for name, value in rows:
        print(f"{name + ':':<18}{value}")


def sessions(client: SalienceClient, args: argparse.Namespace) -> None:
    """Prints a table of the live sessions."""
    infos = client.list_sessions()
    if not infos:
        print("no sessions")
        return
    print(
        f"{'SESSION':<34} {'LENGTH':>7} {'MAX':>7} {'RESIDENCY':<10} {'KV MiB':>8} "
        f"{'IDLE s':>8}  BUSY"
    )
    for s in sorted(infos, key=lambda s: s.idle_seconds):
        print(
            f"{s.session_id:<34} {s.length:>7} {s.max_context:>7} {s.residency:<10} "
            f"{s.kv_bytes / 2**20:>8.2f} {s.idle_seconds:>8.1f}  {'yes' if s.is_busy else 'no'}"
        )


def describe(error: SalienceClientError, target: str) -> str:
    """One line a person can act on."""
    if error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "UNAVAILABLE":
        return f"cannot reach the server at {target} (is it running?)"
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server did not answer in time (--timeout) [{error.code.name}]"
    return f"{error.message} [{error.code.name}, {error.reason}]"


def _connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``--target``, ``--api-key`` and ``--timeout``, taken before or after the command
    (after it, only what is given: the defaults come from before it)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        type=_target,
        default=default(DEFAULT_TARGET),
        help=f"server address, HOST:PORT (default: {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("SALIENCE_API_KEY") or None),
        help="bearer token for a server started with --api-key (default: $SALIENCE_API_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=default(30.0),
        help="seconds per unary call (default: 30)",
    )


def _target(text: str) -> str:
    """An argparse type: a gRPC target (an empty one, or an HTTP URL such as the shim's,
    failed later with grpc's own error lines)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the target is empty, not HOST:PORT")
    if text.lower().startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text} is an HTTP URL; give the gRPC server's HOST:PORT (not the shim's)"
        )
    return text


def _within(kind: Callable[[str], Any], low: float, high: float) -> Any:
    """An argparse type: ``kind`` values in [low, high] (NaN is not)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not between {low} and {high}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _positive(kind: Callable[[str], Any]) -> Any:
    """An argparse type: finite ``kind`` values above 0."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="salience", description="Talk to a Salience server.")
    _connection_options(parser, defaults=True)
    connection = argparse.ArgumentParser(add_help=False)
    _connection_options(connection, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, parents=[connection])

    chat_parser = command(
        "chat",
        "chat with the model (one session per run; each line is a turn, a line ending in \\ "
        "going on to the next; /exit or Ctrl-D ends it)",
    )
    chat_parser.add_argument(
        "--max-tokens",
        type=_within(int, 1, END),
        default=512,
        help="most tokens a reply decodes (default: 512)",
    )
    chat_parser.add_argument(
        "--temperature",
        type=_within(float, 0.0, 2.0),
        default=0.7,
        help="sampling temperature, 0 for greedy (default: 0.7)",
    )
    chat_parser.add_argument(
        "--seed", type=_within(int, 0, 2**64 - 1), help="seed the sampler (reproducible replies)"
    )
    chat_parser.add_argument("--system", help="a system message opening the conversation")
    score_parser = command("score", "per-token logprobs of a text")
    score_parser.add_argument(
        "text",
        nargs="?",
        help="the text to score (- reads standard input as it is, a final newline included)",
    )
    score_parser.add_argument("--tokens", help="token ids instead of text: '1,2,3'")
    score_parser.add_argument(
        "--add-special-tokens",
        action="store_true",
        help="tokenize with the tokenizer's special tokens (a BOS, for models whose "
        "tokenizer adds one)",
    )
    command("info", "describe the served model")
    command("sessions", "list the live sessions")
    return parser.parse_args(argv)


_COMMANDS: dict[str, Callable[[SalienceClient, argparse.Namespace], None]] = {
    "chat": chat,
    "score": score,
    "info": info,
    "sessions": sessions,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``salience``."""
    args = parse_args(argv)
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 reach is_utf8
        sys.stdin.reconfigure(errors="surrogateescape")  # (a UTF-8 locale raised on them)
    try:
        with SalienceClient(args.target, timeout=args.timeout, api_key=args.api_key) as client:
            _COMMANDS[args.command](client, args)
    except SalienceClientError as error:
        sys.exit(f"salience: {describe(error, args.target)}")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
