"""The command line every benchmark shares."""

from __future__ import annotations

import argparse

QUICK_HELP = "smaller shapes of the same question: a run under two minutes"


def is_quick(doc: str | None) -> bool:
    """Parses a benchmark's command line (``--quick`` alone); ``doc`` is its docstring."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    return bool(parser.parse_args().quick)
