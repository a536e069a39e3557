"""A multi-turn conversation on one session: each turn sends only its new tokens.

Run a server first (`make serve`), then: .venv/bin/python examples/agent_session.py
"""

from __future__ import annotations

import sys

from salience_client import Done, SalienceClient

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
QUESTIONS = ["Name a planet.", "How far is it from the Sun?", "And its largest moon?"]


def main() -> None:
    with SalienceClient(TARGET) as client:
        client.wait_ready()  # a server just started may still be loading its model
        with client.open_session() as session:
            history: list[dict[str, str]] = []
            held: list[int] = []  # the tokens the session holds
            for question in QUESTIONS:
                history.append({"role": "user", "content": question})
                ids = client.tokenize_chat(history, add_generation_prompt=True)
                # The template may render the last reply a little differently from the
                # tokens decoded (its end-of-turn, say): keep the common prefix, send the rest.
                shared = common_prefix_length(held, ids)
                reply, done = "", None
                for event in session.generate(ids[shared:], truncate_to=shared, max_tokens=48):
                    if isinstance(event, Done):
                        done = event
                    else:
                        reply += event.text
                        ids.append(event.token_id)
                assert done is not None
                held = ids
                print(f"> {question}\n{reply.strip()}")
                print(
                    f"  (sent {len(held) - shared - done.completion_tokens} tokens, "
                    f"{done.cached_tokens} already cached)\n"
                )
                history.append({"role": "assistant", "content": reply.strip()})


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


if __name__ == "__main__":
    main()
