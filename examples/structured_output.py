"""Structured output two ways: the OpenAI SDK's ``parse`` with a pydantic model through
the shim, and a regex constraint on a gRPC session. Decoding is constrained by a
grammar, so the output always parses.

Run `make serve ARGS="--http-port 8000"`, then: .venv/bin/python examples/structured_output.py
(or pass the gRPC target and the shim's base URL: HOST:PORT http://HOST:PORT/v1)
"""

from __future__ import annotations

import sys

from openai import OpenAI
from pydantic import BaseModel, Field

from salience_client import SalienceClient

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
BASE_URL = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000/v1"


class City(BaseModel):
    name: str = Field(max_length=32)
    country: str = Field(max_length=32)
    is_capital: bool


def main() -> None:
    with SalienceClient(TARGET) as client:
        client.wait_ready()  # a server just started may still be loading its model
    openai = OpenAI(base_url=BASE_URL, api_key="unused")
    model = openai.models.list().data[0].id
    completion = openai.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        response_format=City,
        max_tokens=100,
    )
    print("parsed:", completion.choices[0].message.parsed)

    with SalienceClient(TARGET) as client, client.open_session() as session:
        prompt = client.tokenize_chat(
            [{"role": "user", "content": "What time is it? Answer HH:MM."}],
            add_generation_prompt=True,
        )
        text = "".join(
            event.text
            for event in session.generate(
                prompt, max_tokens=8, constraint={"regex": "[0-2][0-9]:[0-5][0-9]"}
            )
            if hasattr(event, "token_id")
        )
        print("time:", text)


if __name__ == "__main__":
    main()
