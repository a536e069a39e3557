"""Question: what does one decode step cost in Salience's engine, in float32 and in
bfloat16, against a plain transformers decode loop?

Baseline: the same model's plain transformers greedy loop (DynamicCache, batch 1 and a
padded batch of 8), in this process, in the same dtype. Measured: the engine stepped
in this process (no gRPC), sessions decoding together after a prompt of ``--context``
tokens (103 unless told). Prints ms per step and the ratios: engine ÷ transformers in
each dtype, and bf16 ÷ fp32 for each. ``--model`` takes another model directory or GGUF
(the default model's), ``--device`` another device (both run there; CUDA when present).

    .venv/bin/python -m benchmarks.decode [--quick] [--context 2000] [--model DIR]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from benchmarks import _cli
from salience_server.config import EngineConfig, ModelConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import load_model, resolve_device, resolve_model_path
from salience_server.engine.model_runner import kv_bytes_per_token, kv_dtype
from salience_server.engine.request import GenerateParams
from salience_server.engine.session import Session

PROMPT_TOKENS = 103
MIN_POOL_BYTES = 256 << 20


@dataclass(frozen=True)
class Where:
    """The model decoded (None: the default model) and the device it runs on."""

    model: str | None = None
    device: str = "auto"


class EngineDecoder:
    """``batch`` sessions of the engine, stepped in this process, decoding together."""

    def __init__(
        self, dtype: str, batch: int, prompt_tokens: int = PROMPT_TOKENS, where: Where = Where()
    ) -> None:
        loaded = load_model(ModelConfig(model=where.model, dtype=dtype, device=where.device))
        # Room for every session's prompt and a few hundred decoded tokens: a pool that
        # ran out would measure preemption, not decoding.
        token_bytes = kv_bytes_per_token(loaded.model.config, kv_dtype(loaded.device, loaded.dtype))
        pool_bytes = max(MIN_POOL_BYTES, 2 * batch * (prompt_tokens + 256) * token_bytes)
        self.engine = Engine(loaded, EngineConfig(kv_cache_bytes=pool_bytes))
        self.sessions = [self.engine.open_session() for _ in range(batch)]
        vocab_size = loaded.model.config.get_text_config().vocab_size
        self.prompts = [_prompt(i, prompt_tokens, vocab_size) for i in range(batch)]
        self.run(4)  # prefill and warm-up

    def run(self, num_steps: int) -> float:
        """Decodes ``num_steps`` tokens in every session; ms per step."""
        for session, prompt in zip(self.sessions, self.prompts, strict=True):
            self.submit(session, prompt if session.length == 0 else [], num_steps)
        start = time.perf_counter()
        while self.engine.scheduler.has_work():
            self.engine.step()
        return (time.perf_counter() - start) / num_steps * 1e3

    def submit(self, session: Session, append_tokens: list[int], max_tokens: int) -> None:
        """Queues a call on ``session`` that appends ``append_tokens`` and decodes
        ``max_tokens`` (EOS ignored); its events go nowhere."""
        params = GenerateParams(
            session_id=session.session_id,
            append_tokens=append_tokens,
            offset=session.length,
            max_tokens=max_tokens,
            ignore_eos=True,
        )
        self.engine.submit(params, lambda event: None)


class PlainDecoder:
    """A plain transformers greedy loop over a batch (DynamicCache)."""

    def __init__(
        self, dtype: str, batch: int, prompt_tokens: int = PROMPT_TOKENS, where: Where = Where()
    ) -> None:
        path, _ = resolve_model_path(where.model)
        self.device = resolve_device(where.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), device_map=self.device, use_kernels=False
        )  # the model's own layers, as the engine runs them (and no Hub download)
        self.model.eval()
        vocab_size = self.model.config.get_text_config().vocab_size
        prompt = [_prompt(i, prompt_tokens, vocab_size) for i in range(batch)]
        with torch.inference_mode():
            output = self.model(torch.tensor(prompt, device=self.device), use_cache=True)
        self.cache, self.tokens = output.cache, output.logits[:, -1].argmax(-1)
        self.run(4)

    @torch.inference_mode()
    def run(self, num_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(num_steps):
            output = self.model(self.tokens[:, None], cache=self.cache, use_cache=True)
            self.cache, self.tokens = output.cache, output.logits[:, -1].argmax(-1)
        self.tokens.tolist()  # waits for the device, as the engine's step does
        return (time.perf_counter() - start) / num_steps * 1e3


def _prompt(index: int, num_tokens: int, vocab_size: int) -> list[int]:
    """Session ``index``'s prompt: distinct token ids, in the vocabulary's middle (of a
    small one, wrapped)."""
    return [(1000 + (7 * index + j) % 20000) % vocab_size for j in range(num_tokens)]


def best_of_rounds(decoders: dict[str, object], num_steps: int, rounds: int) -> dict[str, float]:
    """Each decoder's best ms per step over ``rounds`` rounds, taking turns, so that a
    slow moment of the machine hurts them alike."""
    best = {name: float("inf") for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            best[name] = min(best[name], decoder.run(num_steps))  # type: ignore[attr-defined]
    return best


def main() -> None:
    parsing = _cli.parser(__doc__)
    parsing.add_argument(
        "--context", type=int, default=PROMPT_TOKENS, help="prompt tokens before decoding"
    )
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    parsing.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = parsing.parse_args()
    num_steps, rounds = (8, 2) if args.quick else (16, 4)
    print(
        f"decoding after a {args.context}-token prompt on {resolve_device(args.device)}",
        flush=True,
    )
    figures: dict[tuple[str, int], tuple[float, float]] = {}
    for batch in (1, 8):
        decoders: dict[str, object] = {}
        for dtype in ("float32", "bfloat16"):
            where = Where(args.model, args.device)
            decoders[f"engine {dtype}"] = EngineDecoder(dtype, batch, args.context, where)
            decoders[f"plain {dtype}"] = PlainDecoder(dtype, batch, args.context, where)
        best = best_of_rounds(decoders, num_steps, rounds)
        for dtype in ("float32", "bfloat16"):
            engine, plain = best[f"engine {dtype}"], best[f"plain {dtype}"]
            figures[dtype, batch] = (engine, plain)
            print(
                f"{dtype:>8} batch {batch}: engine {engine:6.1f} ms/step, transformers loop "
                f"{plain:6.1f} ms/step, engine/transformers {engine / plain:.2f}",
                flush=True,
            )
    for batch in (1, 8):
        engine_ratio = figures["bfloat16", batch][0] / figures["float32", batch][0]
        plain_ratio = figures["bfloat16", batch][1] / figures["float32", batch][1]
        print(
            f"batch {batch}: bf16/fp32 step time: engine {engine_ratio:.2f}, "
            f"transformers {plain_ratio:.2f}"
        )


if __name__ == "__main__":
    main()
