"""Scoring: the log-likelihood of each answer given a question, as evaluation
harnesses compute it, with one prefill of the question shared by every answer (fork).

Run a server first (`make serve`), then: .venv/bin/python examples/score_choices.py
"""

from __future__ import annotations

import sys

from salience_client import SalienceClient

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
QUESTION = "Question: What is the capital of France?\nAnswer:"
CHOICES = [" Paris", " London", " Berlin", " Madrid"]


def main() -> None:
    with SalienceClient(TARGET) as client:
        client.wait_ready()  # a server just started may still be loading its model
        with client.open_session() as question:
            question.prefill(client.tokenize(QUESTION))
            for choice in CHOICES:
                with question.fork() as branch:
                    ids = client.tokenize(choice)
                    start = branch.length
                    (total,) = branch.score(ids, ranges=[(start, start + len(ids))])
                print(f"{total:8.3f}  {choice.strip()}")


if __name__ == "__main__":
    main()
