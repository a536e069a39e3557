"""The command line every benchmark shares."""

from __future__ import annotations

import argparse

QUICK_HELP = "smaller shapes of the same question: a run under two minutes"


def is_quick(doc: str | None) -> bool:
    """Parses a benchmark's command line (``--quick`` alone); ``doc`` is its docstring."""
    return bool(parse_args(doc).quick)


def parse_args(doc: str | None, with_dtype: bool = False) -> argparse.Namespace:
    """A benchmark's command line: ``--quick``, and ``--dtype`` (the server's) where
    ``with_dtype``."""
    return parser(doc, with_dtype).parse_args()


def parser(doc: str | None, with_dtype: bool = False) -> argparse.ArgumentParser:
    """``parse_args``'s parser, for a benchmark that adds options of its own."""
    parsing = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    parsing.add_argument("--quick", action="store_true", help=QUICK_HELP)
    if with_dtype:
        parsing.add_argument("--dtype", default="auto", help="the server's --dtype")
    return parsing
