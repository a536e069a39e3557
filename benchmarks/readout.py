"""Question: what does readout on every decoded token cost?

One server on the default model with a readout of 16 concepts at every layer. The
baseline is the same greedy decode (64 tokens) without readout_ranges; measured is
the decode with readout on every token. Prints decode tokens per second of each and
the slowdown (aim: under 10%). ``--quick``: 16 tokens, one round.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from benchmarks._cli import is_quick
from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path

NUM_TOKENS = 64
NUM_CONCEPTS = 16
ROUNDS = 3
QUICK_TOKENS = 16
QUICK_ROUNDS = 1


def decode_rate(stub, prompt: list[int], readout: bool, num_tokens: int) -> float:
    session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
    ranges = [pb.PositionRange(start=0, end=0xFFFFFFFF)] if readout else []
    request = pb.GenerateRequest(
        session_id=session_id, append_tokens=prompt, max_tokens=num_tokens, readout_ranges=ranges
    )
    stamps = [
        time.perf_counter()
        for e in stub.Generate(request)
        if e.HasField("token") and not e.token.is_prefill
    ]
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    quick = is_quick(__doc__)
    num_tokens, rounds = (QUICK_TOKENS, QUICK_ROUNDS) if quick else (NUM_TOKENS, ROUNDS)
    path, _ = resolve_model_path(None)
    config = AutoConfig.from_pretrained(path)
    tensors = {
        f"layers.{i}": torch.randn(NUM_CONCEPTS, config.hidden_size)
        for i in range(config.num_hidden_layers)
    }
    readout_file = Path(tempfile.mkdtemp()) / "readout.safetensors"
    concepts = [f"concept{i}" for i in range(NUM_CONCEPTS)]
    save_file(tensors, str(readout_file), metadata={"concepts": json.dumps(concepts)})
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a long story about the history of tea."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    with (
        running_server("--readout", str(readout_file)) as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = salience_pb2_grpc.SalienceStub(channel)
        decode_rate(stub, prompt, False, num_tokens)  # warm-up
        off = max(decode_rate(stub, prompt, False, num_tokens) for _ in range(rounds))
        on = max(decode_rate(stub, prompt, True, num_tokens) for _ in range(rounds))
    print(
        f"readout off: {off:.1f} tok/s; readout on every token ({config.num_hidden_layers} layers x "
        f"{NUM_CONCEPTS} concepts): {on:.1f} tok/s; slowdown {(1 - on / off) * 100:.1f}%"
    )


if __name__ == "__main__":
    main()
