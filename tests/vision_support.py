"""What the vision tests share: images, the transformers inputs of a sequence of text
and images (the oracle's), and appending such a sequence to a session over gRPC."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from salience_client.pb import salience_pb2 as pb
from tests.helpers import U32_MAX, generate

TOLERANCE = 1e-4


def make_image(seed: int, size=(90, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def model_info(server) -> pb.GetModelInfoResponse:
    return server.stub.GetModelInfo(pb.GetModelInfoRequest())


def reference_inputs(server, pieces: list) -> dict:
    """transformers inputs for a sequence of token lists and PIL images."""
    info = model_info(server)
    processor = server.engine.loaded.image_processor
    ids, images = [], []
    for piece in pieces:
        if isinstance(piece, Image.Image):
            features = processor(images=[piece], return_tensors="pt")
            num_tokens = int(features["image_grid_thw"].prod()) // 4
            ids += (
                [info.vision_start_token_id]
                + [info.image_pad_token_id] * num_tokens
                + [info.vision_end_token_id]
            )
            images.append(features)
        else:
            ids += piece
    input_ids = torch.tensor([ids])
    inputs = {
        "input_ids": input_ids,
        "mm_token_type_ids": (input_ids == info.image_pad_token_id).int(),
    }
    if images:
        inputs["pixel_values"] = torch.cat([f["pixel_values"] for f in images])
        inputs["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in images])
    return inputs


def append_pieces(
    server, session_id: str, pieces: list, logprobs_from: int = 0
) -> tuple[int, list]:
    """Appends text pieces (Generate) and images (AppendImage, wrapped in the vision
    start/end tokens as a client writes them); returns (length, token events)."""
    info = model_info(server)
    length, events = 0, []
    for piece in pieces:
        if isinstance(piece, Image.Image):
            generate(
                server.stub, session_id, append_tokens=[info.vision_start_token_id], offset=length
            )
            response = server.stub.AppendImage(
                pb.AppendImageRequest(
                    session_id=session_id,
                    image=encode(piece),
                    mime_type="image/png",
                    offset=length + 1,
                )
            )
            assert response.total_length == length + 1 + response.placeholder_count
            length = response.total_length
            piece = [info.vision_end_token_id]
        tokens, done = generate(
            server.stub,
            session_id,
            append_tokens=piece,
            offset=length,
            logprobs_ranges=[(max(length, logprobs_from), U32_MAX)],
        )
        events += tokens
        length = done.total_tokens
    return length, events
