"""The command lines of ``salience-server`` and ``salience-shim``: bad values are one usage
line (exit 2), never a traceback; ``--help`` names the defaults; the logs they write."""

from __future__ import annotations

import logging

import pytest

from salience_server.http.__main__ import parse_args


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "bogus"],  # a ValueError traceback from logging
        ["--keepalive-s", "nan"],  # taken
        ["--grace-s", "-1"],
        ["--grace-s", "inf"],
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: salience-shim") and "Traceback" not in error


def test_the_grace_and_log_level_are_taken() -> None:
    config = parse_args(["--grace-s", "2.5", "--log-level", "WARNING"])
    assert config.grace_s == 2.5 and config.graceful_shutdown_s == 4.5
    assert config.log_level == "warning"


@pytest.mark.parametrize("module", ["salience_server", "salience_server.http"])
def test_help_shows_defaults_but_never_the_api_key(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Operators read --help: each option's default is there (most were missing),
    sizes as the flag takes them, and the key from the environment is not."""
    import importlib

    monkeypatch.setenv("SALIENCE_API_KEY", "sekrit-from-env")
    with pytest.raises(SystemExit):
        importlib.import_module(f"{module}.__main__").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sekrit" not in text
    assert "--port PORT default:" in text and "--host HOST default: 127.0.0.1" in text
    if module == "salience_server":
        assert "--max-image-bytes MAX_IMAGE_BYTES default: 20MiB" in text
        assert "shim here (default: 0)" in text  # a 0 was taken for no default
    else:
        assert "(default: 256MiB)" in text


def test_probes_are_left_out_of_the_shims_access_log() -> None:
    """Health checks and metrics scrapes (dozens while a model loads) buried requests."""
    import logging

    from salience_server.http.config import ShimConfig
    from salience_server.http.serving import ShimServer

    server = ShimServer(ShimConfig(port=0))
    server.socket.close()
    access = logging.getLogger("uvicorn.access")

    def kept(path: str) -> bool:
        args = ("127.0.0.1:5000", "GET", path, "1.1", 200)
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, "", 0, "%s %s %s %s %d", args, None
        )
        return all(f.filter(record) for f in access.filters)  # type: ignore[union-attr]

    assert not kept("/health") and not kept("/metrics") and kept("/v1/chat/completions")


def test_a_bind_failure_on_every_interface_is_the_port() -> None:
    """An empty host (every interface) does not resolve by name: a taken port was
    reported as a host that does not resolve."""
    from salience_server.rpc.server import _bind_failure

    assert _bind_failure("") == _bind_failure("0.0.0.0") == "the port is in use"
    assert "does not resolve" in _bind_failure("999.1.1.1")


def test_speculation_flags_without_speculation_are_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--num-speculative-tokens and the n-gram sizes did nothing without --speculative,
    and nothing said so."""
    from salience_server.__main__ import parse_args as server_args

    with caplog.at_level(logging.WARNING):
        server_args(["--num-speculative-tokens", "8", "--prompt-lookup-max", "5"])
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == (
        "--num-speculative-tokens, --prompt-lookup-max take effect only with --speculative ngram"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config = server_args(["--speculative", "ngram", "--num-speculative-tokens", "8"])
        server_args([])
    assert config.engine.num_speculative_tokens == 8
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
