"""oneDNN keeps a kernel per row count of each prepacked product, in two caches of 1,024
entries by default: a server whose prefills came in many lengths grew by about 1 GiB.
``prepare_linears`` bounds them (``KERNEL_CACHE_ENTRIES``) unless the environment says
otherwise. Each check runs in a fresh process: the caches are the process's, sized when
first used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salience_server.engine import cpu_matmul, kernel_caches

ROOT = Path(__file__).resolve().parents[2]

MEASURE = """
import ctypes, json, os, sys
import torch
from salience_server.engine import cpu_matmul

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=576, intermediate_size=960, num_hidden_layers=1, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=256,
)
model = LlamaForCausalLM(config).eval()
cpu_matmul.prepare_linears(model, torch.device("cpu"), torch.float32)
up = model.model.layers[0].mlp.up_proj  # 576 -> 960, prepacked
assert up.weight.is_mkldnn
marks = []
with torch.inference_mode():
    for rows in range(1, 601):
        up(torch.randn(rows, 576))
        if rows in (300, 600):
            marks.append(libc.mallinfo2().uordblks)
print(json.dumps({
    "grown_mib": (marks[1] - marks[0]) / 2**20,
    "entries": [os.environ.get("LRU_CACHE_CAPACITY"),
                os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")],
}))
"""


def _measure(environment: dict[str, str]) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        if name not in environment:
            env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(
    not cpu_matmul.prepacks(torch.device("cpu"), torch.float32),
    reason="float32 weights are prepacked on x86 CPUs with AVX2 only",
)
def test_products_of_many_row_counts_stop_growing_memory() -> None:
    bounded = _measure({})
    entries = str(kernel_caches.KERNEL_CACHE_ENTRIES)
    assert bounded["entries"] == [entries, entries]
    # Rows 301 to 600 are new row counts past the bound: their kernels replace others.
    assert bounded["grown_mib"] < 8, bounded
    # The environment's own sizes win; at oneDNN's default the same products keep
    # every kernel (about 0.6 MiB each here).
    unbounded = _measure({"LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert unbounded["entries"] == ["1024", "1024"]
    assert unbounded["grown_mib"] > 60, unbounded
