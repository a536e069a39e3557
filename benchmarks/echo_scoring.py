"""Question: how much faster does the shim score multiple-choice questions, one context
with each of its continuations in turn (lm-eval's loglikelihood requests), now that a
pooled session keeps the scores of what it holds?

Each question: a 400-token context and 4 continuations of 12 tokens, each sent as one
``/v1/completions`` request with ``echo``, ``logprobs: 1`` and ``max_tokens: 0`` (the
prompt as token ids), one request at a time as lm-eval sends them with batch size 1;
then each question's continuations together in one request (a batch size of 4).
Baseline: the same number of requests of the same lengths, where every prompt has a
context of its own, so nothing can be reused (what every request cost before). Prints
the totals, the ratios, and the ``cached_tokens`` each reported. ``--quick``: 3
questions of 200-token contexts.

    .venv/bin/python -m benchmarks.echo_scoring [--quick]
"""

from __future__ import annotations

import time

import httpx

from benchmarks._cli import is_quick
from benchmarks._prompts import Texts
from benchmarks._server import free_port, running_server
from salience_server.engine.loader import resolve_model_path

NUM_QUESTIONS, CONTEXT_TOKENS = 6, 400
QUICK_QUESTIONS, QUICK_CONTEXT_TOKENS = 3, 200
NUM_CHOICES, CHOICE_TOKENS = 4, 12
READY_S = 120.0


def _ids(texts: Texts, num_tokens: int) -> list[int]:
    ids = texts.tokenizer.encode(" " + texts.take(num_tokens + 8), add_special_tokens=False)
    return list(ids[:num_tokens])


def _score(
    http: httpx.Client, url: str, model: str, prompt: list[int] | list[list[int]]
) -> tuple[float, int]:
    """(seconds, cached_tokens) of one echo scoring request (of one prompt or several)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    start = time.perf_counter()
    response = http.post(f"{url}/completions", json=body)
    response.raise_for_status()
    elapsed = time.perf_counter() - start
    usage = response.json()["usage"]
    return elapsed, int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _wait_ready(http: httpx.Client, url: str) -> str:
    """The served model's name, once the shim answers."""
    deadline = time.monotonic() + READY_S
    while True:
        try:
            return str(http.get(f"{url}/models").json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    from transformers import AutoTokenizer

    quick = is_quick(__doc__)
    questions = QUICK_QUESTIONS if quick else NUM_QUESTIONS
    context_tokens = QUICK_CONTEXT_TOKENS if quick else CONTEXT_TOKENS
    path, _ = resolve_model_path(None)
    texts = Texts(AutoTokenizer.from_pretrained(path))

    def questions_of(num: int) -> list[list[int]]:
        """Prompts of ``num`` questions: one context each, each continuation in turn."""
        prompts = []
        for _ in range(num):
            context = _ids(texts, context_tokens)
            prompts += [context + _ids(texts, CHOICE_TOKENS) for _ in range(NUM_CHOICES)]
        return prompts

    shared, batched = questions_of(questions), questions_of(questions)  # none in common
    alone = [_ids(texts, context_tokens) + _ids(texts, CHOICE_TOKENS) for _ in shared]
    http_port = free_port()
    with (
        running_server("--http-port", str(http_port)),
        httpx.Client(timeout=600) as http,
    ):
        url = f"http://127.0.0.1:{http_port}/v1"
        model = _wait_ready(http, url)
        _score(http, url, model, _ids(texts, 32))  # warm-up
        batches = [batched[i : i + NUM_CHOICES] for i in range(0, len(batched), NUM_CHOICES)]
        runs: list[tuple[str, list[list[int]] | list[list[list[int]]]]] = [
            ("each context alone", alone),
            ("shared contexts", shared),
            ("shared contexts, a question per request", batches),
        ]
        totals = {}
        for name, requests in runs:
            results = [_score(http, url, model, prompt) for prompt in requests]
            totals[name] = sum(seconds for seconds, _ in results)
            cached = sum(tokens for _, tokens in results)
            print(
                f"{name}: {len(requests)} requests, {totals[name]:.2f} s, cached_tokens {cached}",
                flush=True,
            )
    baseline = totals["each context alone"]
    for name, _ in runs[1:]:
        ratio = totals[name] / baseline
        print(
            f"multiple-choice echo scoring, {name}: {ratio:.2f}x the time of unshared "
            f"prompts ({1 / ratio:.2f}x faster); {NUM_CHOICES} choices of {CHOICE_TOKENS} "
            f"tokens after a {context_tokens}-token context"
        )


if __name__ == "__main__":
    main()
