"""Question: how much of the KV pool do idle sessions really get?

Fills a 1 GiB pool with idle 2,000-token sessions on the default model (no host
offload) until the first one loses residency, then prints how many stayed resident
against how many the pool holds in theory (1 GiB / bytes of KV for 2,000 tokens).
Aim: a ratio over 0.9. ``--quick``: 400-token sessions in a 128 MiB pool.
"""

from __future__ import annotations

import grpc

from benchmarks._cli import is_quick
from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path
from salience_server.engine.model_runner import kv_bytes_per_token

POOL_BYTES = 1 << 30
SESSION_TOKENS = 2000
QUICK_POOL_BYTES = 128 << 20
QUICK_SESSION_TOKENS = 400


def main() -> None:
    import torch
    from transformers import AutoConfig

    quick = is_quick(__doc__)
    pool_bytes = QUICK_POOL_BYTES if quick else POOL_BYTES
    session_tokens = QUICK_SESSION_TOKENS if quick else SESSION_TOKENS
    path, _ = resolve_model_path(None)
    token_bytes = kv_bytes_per_token(AutoConfig.from_pretrained(path), torch.float32)
    theory = pool_bytes / (session_tokens * token_bytes)
    args = (
        "--kv-cache-memory",
        str(pool_bytes),
        "--host-kv-memory",
        "0",
        "--max-batch-tokens",
        "2048",
    )
    with running_server(*args) as target, grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        sessions: list[str] = []
        while True:
            session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
            tokens = [(7 * i + len(sessions)) % 40000 + 100 for i in range(session_tokens)]
            for _ in stub.Generate(pb.GenerateRequest(session_id=session_id, append_tokens=tokens)):
                pass
            sessions.append(session_id)
            listing = stub.ListSessions(pb.ListSessionsRequest()).sessions
            resident = [s for s in listing if s.residency == pb.RESIDENCY_RESIDENT]
            if len(resident) < len(listing):
                break
    print(
        f"resident idle {session_tokens}-token sessions in a {pool_bytes >> 20} MiB pool: "
        f"{len(resident)}; "
        f"in theory {theory:.2f} ({token_bytes} bytes of KV per token); "
        f"ratio {len(resident) / theory:.2f}"
    )


if __name__ == "__main__":
    main()
