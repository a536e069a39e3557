"""Embeddings: the Python client's ``embed`` (over gRPC) and the OpenAI SDK's
``embeddings.create`` (through the shim), ranking a few documents against a query by
cosine similarity.

Run `make serve ARGS="--http-port 8000"`, then: .venv/bin/python examples/embeddings.py
(or pass the gRPC target and the shim's base URL: HOST:PORT http://HOST:PORT/v1)
"""

from __future__ import annotations

import sys

from openai import OpenAI

from salience_client import SalienceClient

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
BASE_URL = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8000/v1"
DOCUMENTS = [
    "The Eiffel Tower is in Paris.",
    "Photosynthesis turns light into chemical energy.",
    "The Louvre is a museum in Paris.",
]


def main() -> None:
    query = "Which landmarks are in France?"
    with SalienceClient(TARGET) as client:
        client.wait_ready()  # a server just started may still be loading its model
        result = client.embed(texts=[query, *DOCUMENTS], pooling="mean", normalize=True)
    query_vector, *document_vectors = result.vectors
    scores = [sum(q * d for q, d in zip(query_vector, v, strict=True)) for v in document_vectors]
    for score, document in sorted(zip(scores, DOCUMENTS, strict=True), reverse=True):
        print(f"{score:.3f}  {document}")

    openai = OpenAI(base_url=BASE_URL, api_key="unused")
    model = openai.models.list().data[0].id
    reply = openai.embeddings.create(model=model, input=DOCUMENTS)
    print(f"{len(reply.data)} vectors of {len(reply.data[0].embedding)} values from the shim")


if __name__ == "__main__":
    main()
