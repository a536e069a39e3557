"""Question: how much does serving through gRPC streaming cost over a plain decode loop?

Baseline: the same model's plain transformers greedy decode loop (DynamicCache), in this
process. Measured: decode tokens per second of one Generate stream from a server
subprocess (time from the first to the last token). Prints the ratio; aim >= 0.9.
``--quick``: 32 tokens.
"""

from __future__ import annotations

import time

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks._cli import is_quick
from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path

NUM_TOKENS = 128
QUICK_TOKENS = 32
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def plain_decode_tokens_per_s(model, prompt_ids: list[int], num_tokens: int) -> float:
    with torch.inference_mode():
        output = model(torch.tensor([prompt_ids]), use_cache=True)
        cache, token = output.cache, output.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(num_tokens - 1):
            output = model(token.view(1, 1), cache=cache, use_cache=True)
            cache, token = output.cache, output.logits[0, -1].argmax()
        return (num_tokens - 1) / (time.perf_counter() - start)


def served_tokens_per_s(target: str, prompt_ids: list[int], num_tokens: int) -> tuple[float, int]:
    with grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        best = 0.0
        for _ in range(2):  # the first run warms up
            session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
            request = pb.GenerateRequest(
                session_id=session_id, append_tokens=prompt_ids, max_tokens=num_tokens
            )
            times = [
                time.perf_counter() for event in stub.Generate(request) if event.HasField("token")
            ]
            best = max(best, (len(times) - 1) / (times[-1] - times[0]))
        return best, len(times)


def main() -> None:
    num_tokens = QUICK_TOKENS if is_quick(__doc__) else NUM_TOKENS
    path, _ = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt_ids, add_special_tokens=False)
    with running_server() as target:
        served, num_decoded = served_tokens_per_s(target, prompt_ids, num_tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain_decode_tokens_per_s(model, prompt_ids, 8)  # warm-up
    plain = plain_decode_tokens_per_s(model, prompt_ids, num_decoded)
    print(
        f"plain transformers loop: {plain:.1f} tok/s; served over gRPC: {served:.1f} tok/s "
        f"({num_decoded} tokens); ratio {served / plain:.2f}"
    )


if __name__ == "__main__":
    main()
