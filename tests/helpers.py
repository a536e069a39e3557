"""Small helpers for talking to a server through raw stubs in tests."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any

import grpc
import torch
from grpc_status import rpc_status

from salience_client.pb import salience_pb2 as pb

U32_MAX = 0xFFFFFFFF


def open_session(stub: Any, **kwargs: Any) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(**kwargs)).session_id


def generate(stub: Any, session_id: str, **kwargs: Any) -> tuple[list[pb.Token], pb.Done]:
    """Runs one Generate call to the end: (token events, done)."""
    ranges = {
        key: [pb.PositionRange(start=s, end=e) for s, e in kwargs.pop(key)]
        for key in ("logprobs_ranges", "readout_ranges")
        if key in kwargs
    }
    request = pb.GenerateRequest(session_id=session_id, **kwargs, **ranges)
    tokens, done = [], None
    for event in stub.Generate(request):
        if event.HasField("token"):
            tokens.append(event.token)
        else:
            done = event.done
    assert done is not None, "the stream ended without Done"
    return tokens, done


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error}"
    from google.rpc import error_details_pb2

    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status details")


def reference_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[L, V] raw logprobs of one plain transformers forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def reference_greedy(
    model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """transformers generate(do_sample=False) as new token ids (EOS included, then stop)."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return output[0, len(prompt_ids) :].tolist()


def server_start_failure(*args: str) -> str:
    """Runs ``salience-server ARGS``, which must fail at start: exit 1, one logged error
    line, no traceback. Returns its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "salience_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def random_tokens(count: int, seed: int) -> list[int]:
    """``count`` byte-token ids drawn from one seeded generator."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(count)]
