"""``salience-shim``'s command line: bad values are one usage line (exit 2), never a
traceback."""

from __future__ import annotations

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
