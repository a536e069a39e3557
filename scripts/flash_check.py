"""flash-attn's kernels against torch SDPA inside the model runner, in bfloat16 on a GPU
(part of scripts/gpu_check.sh: the suite runs in float32, which flash-attn does not
take, so only this exercises the real kernels; the tests hold a plain-torch stand-in).

Two steps over the same model: prefills of two sessions (one long), then a chunk of the
long one over its cached context, a decode of the other and a third session's prefill;
flash-attn paged (256-token blocks) and gathered (16-token blocks) against SDPA
(16-token blocks). Prints each one's largest logprob difference from SDPA's and how
many rows pick the same argmax, beside SDPA's own in bfloat16 against float32 (the
rounding a bfloat16 pass brings anyway), then PASS, or FAIL (exit 1) where flash-attn
differs by more than twice that rounding (at least 0.1) or agrees on 5% fewer argmaxes.

    python scripts/flash_check.py MODEL_DIR [cuda]
"""

from __future__ import annotations

import random
import sys

import torch

from salience_server.config import ModelConfig
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.loader import load_model
from salience_server.engine.model_runner import ModelRunner

STEPS = [
    [("a", 0, 300), ("b", 0, 40)],
    [("a", 300, 310), ("b", 40, 41), ("c", 0, 5)],
]
LONGEST = 320


def run(
    model_dir: str, device: str, backend: str, block_size: int, dtype: str = "bfloat16"
) -> list[torch.Tensor]:
    """Each step's [rows, V] float32 logprobs through ``backend``."""
    loaded = load_model(ModelConfig(model=model_dir, dtype=dtype, device=device))
    blocks_each = -(-LONGEST // block_size)
    runner = ModelRunner(loaded.model, 3 * blocks_each, block_size, backend)
    print(f"{backend} with {block_size}-token blocks, {dtype}: {runner.attention.name}")
    rng = random.Random(0)
    vocab = runner.logits_width
    tokens = {name: [rng.randrange(vocab) for _ in range(LONGEST)] for name in "abc"}
    tables = {
        name: list(range(i * blocks_each, (i + 1) * blocks_each)) for i, name in enumerate("abc")
    }
    results = []
    for step in STEPS:
        batch = ForwardBatch()
        for name, start, end in step:
            batch.add_sequence(tokens[name][start:end], start, tables[name], block_size)
        batch.logits_rows = list(range(batch.num_tokens))
        logits = runner.execute(batch).logits
        results.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return results


def main() -> None:
    model_dir = sys.argv[1]
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    try:
        import flash_attn
    except ImportError:
        print("flash-attn is not installed: nothing to compare")
        return
    print(f"flash-attn {flash_attn.__version__}")
    reference = run(model_dir, device, "sdpa", 16)
    rounding = compare(run(model_dir, device, "sdpa", 16, "float32"), reference)
    failed = False
    for block_size in (256, 16):
        found = compare(run(model_dir, device, "flash-attn", block_size), reference)
        for (diff, same), (bf16_diff, bf16_same) in zip(found, rounding, strict=True):
            failed |= diff > max(2 * bf16_diff, 0.1) or same < bf16_same - 0.05
    print(
        "FAIL: flash-attn differs from SDPA by more than bf16 rounding does"
        if failed
        else "PASS: flash-attn agrees with SDPA within bf16 rounding"
    )
    sys.exit(1 if failed else 0)


def compare(got: list[torch.Tensor], reference: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Each step's largest logprob difference and share of rows with the same argmax."""
    found = []
    for index, (mine, theirs) in enumerate(zip(got, reference, strict=True)):
        diff = (mine - theirs).abs().max().item()
        same = (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        print(
            f"  against SDPA bf16, step {index + 1}: {mine.shape[0]} rows, largest logprob "
            f"difference {diff:.4f}, same argmax in {same:.1%} of rows"
        )
        found.append((diff, same))
    return found


if __name__ == "__main__":
    main()
