"""oneDNN's caches of kernels, which the server bounds (``KERNEL_CACHE_ENTRIES``)."""

from __future__ import annotations

import os

KERNEL_CACHE_ENTRIES = 256
"""Kernels oneDNN keeps, in each of its two caches, for the shapes of prepacked products.

Each product of a prepacked weight makes a kernel for its row count, kept in ideep's
cache of computations (``LRU_CACHE_CAPACITY``) and oneDNN's primitive cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), 1,024 each by default, about 0.3-0.6 MiB an
entry at the default model's shapes: a server whose prompts came in many lengths grew
by 400 MB over 30 rounds of ``benchmarks/soak.py``, still growing (about 1 GiB once
both were full, by that entry size). A kernel made afresh
costs 0.3-0.7 ms against 0.04 ms cached at one row, so the bound keeps what decoding
uses (a few weight shapes times the batch sizes of recent steps) and lets rare prefill
lengths go."""


def bound() -> None:
    """Bounds oneDNN's kernel caches (``KERNEL_CACHE_ENTRIES``) unless the environment
    sets them; they read it when first used, so call it before any product."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))
