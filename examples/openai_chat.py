"""The OpenAI SDK against the shim: a stateless chat whose second turn reuses the
first turn's KV (see usage.prompt_tokens_details.cached_tokens).

Run `make serve ARGS="--http-port 8000"`, then: .venv/bin/python examples/openai_chat.py
"""

from __future__ import annotations

from openai import OpenAI


def main() -> None:
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
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
