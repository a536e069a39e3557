"""Best-of-n with ForkSession: the prompt is prefilled once, then n forks sample
independently (copy-on-write KV); the reply with the highest mean logprob wins.

Run a server first (`make serve`), then: .venv/bin/python examples/best_of_n.py
"""

from __future__ import annotations

import sys

from salience_client import Done, SalienceClient, TokenEvent

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
NUM_CANDIDATES = 4


def main() -> None:
    with SalienceClient(TARGET) as client:
        client.wait_ready()  # a server just started may still be loading its model
        with client.open_session() as prompt:
            messages = [{"role": "user", "content": "Write a one-line slogan for a bakery."}]
            prompt.prefill(client.tokenize_chat(messages, add_generation_prompt=True))
            candidates = []
            for seed in range(NUM_CANDIDATES):
                with prompt.fork() as branch:
                    events = list(branch.generate(max_tokens=32, temperature=0.9, seed=seed))
                    tokens = [e for e in events if isinstance(e, TokenEvent)]
                    done = events[-1]
                    assert isinstance(done, Done)
                    mean = sum(t.logprob for t in tokens) / max(1, len(tokens))
                    candidates.append((mean, "".join(t.text for t in tokens).strip()))
            for mean, text in sorted(candidates, reverse=True):
                print(f"{mean:7.3f}  {text}")


if __name__ == "__main__":
    main()
