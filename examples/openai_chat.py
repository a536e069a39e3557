"""The OpenAI SDK against the shim: a stateless chat whose second turn reuses the
first turn's KV (see usage.prompt_tokens_details.cached_tokens).

Run `make serve ARGS="--http-port 8000"`, then: .venv/bin/python examples/openai_chat.py
(or pass the shim's base URL: http://HOST:PORT/v1)
"""

from __future__ import annotations

import sys
import time

import httpx
from openai import OpenAI

BASE_URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"


def wait_ready(base_url: str, timeout_s: float = 120.0) -> None:
    """Until the shim's /health says the server serves (503 while its model loads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base_url.removesuffix("/v1") + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} is not serving after {timeout_s:.0f} s")
        time.sleep(0.5)


def main() -> None:
    wait_ready(BASE_URL)
    client = OpenAI(base_url=BASE_URL, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Give me a word that rhymes with 'light'."}]
    for follow_up in ("Another one?", None):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=32)
        text = reply.choices[0].message.content or ""
        cached = reply.usage.prompt_tokens_details.cached_tokens
        print(f"{text.strip()}\n  ({reply.usage.prompt_tokens} prompt tokens, {cached} cached)")
        messages.append({"role": "assistant", "content": text})
        if follow_up:
            messages.append({"role": "user", "content": follow_up})


if __name__ == "__main__":
    main()
