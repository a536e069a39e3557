"""Images for vision models: decode and check the bytes, then run the vision encoder.

Checks happen before decoding: the bytes' size, the format in the header against
the mime type, and the pixel count from the header (a decompression bomb is refused
before it is decoded). GIFs give their first frame; transparency is laid over white.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from salience_server.engine.errors import (
    Code,
    SalienceError,
    invalid,
    out_of_memory,
    release_cached_memory,
)

MIME_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096


@dataclass
class EncodedImage:
    embeds: torch.Tensor
    """[num_tokens, hidden_size] merged vision embeddings, one per placeholder token, on
    the host."""
    grid: tuple[int, int, int]
    """Merged (t, h, w) grid of placeholder tokens."""


def decode_image(data: bytes, mime_type: str, limits: ImageLimits) -> Image.Image:
    """Decodes ``data`` into an RGB image; INVALID_ARGUMENT with a reason when it is bad."""
    image = open_image(data, mime_type, limits)
    try:
        image.seek(0)  # a GIF's first frame
        image.load()
        return as_rgb(image)
    except Exception as error:
        raise invalid("BAD_IMAGE", f"the image could not be decoded: {error}") from error


def open_image(data: bytes, mime_type: str, limits: ImageLimits) -> Image.Image:
    """``data``'s image, its header read and checked but its pixels not yet decoded."""
    if not data:
        raise invalid("EMPTY_IMAGE", "the image has no bytes")
    if len(data) > limits.max_bytes:
        raise invalid(
            "IMAGE_TOO_LARGE", f"the image has {len(data)} bytes; the limit is {limits.max_bytes}"
        )
    mime_type = mime_type.split(";")[0].strip().lower()  # "image/png; charset=binary"
    expected = MIME_FORMATS.get(mime_type) if mime_type else None
    if mime_type and expected is None:
        raise invalid(
            "UNSUPPORTED_IMAGE_TYPE",
            f"mime type {mime_type!r} is not one of {', '.join(sorted(MIME_FORMATS))}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise invalid("IMAGE_TOO_LARGE", f"the image is too large to decode: {error}") from error
    except Exception as error:
        raise invalid("BAD_IMAGE", "the bytes are not an image Pillow can read") from error
    image_format = _JPEG_FORMS.get(image.format or "", image.format)
    if image_format not in set(MIME_FORMATS.values()):
        raise invalid("UNSUPPORTED_IMAGE_TYPE", f"{image.format} images are not supported")
    if expected is not None and image_format != expected:
        raise invalid("MIME_MISMATCH", f"the bytes are {image.format}, not {mime_type}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise invalid(
            "IMAGE_TOO_LARGE",
            f"the image is {width}x{height}; the limit is {limits.max_pixels} pixels",
        )
    return image


_JPEG_FORMS = {"MPO": "JPEG"}
"""Formats Pillow names that are JPEG files: MPO, the multi-picture JPEG of many phone
cameras (a JPEG whose first picture is the photo)."""


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB, its transparent pixels laid over white, as the transformers image
    processors read it (a plain conversion drops the alpha: transparent reads black)."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


class VisionEncoder:
    """Runs a Qwen2-VL-family image processor and vision tower."""

    def __init__(self, model: Any, image_processor: Any) -> None:
        self.model = model
        self.image_processor = image_processor
        self.merge_size = int(model.config.vision_config.spatial_merge_size)
        self.device = next(model.parameters()).device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        """On CUDA, images are encoded on a stream of their own: a step's one read of its
        results waits for the step's own work only, not for a vision tower queued
        beside it on the default stream (nor an image's read for a step)."""

    def largest_image(self, max_pixels: int) -> Image.Image:
        """A square image of the most pixels the vision tower is given: ``max_pixels``,
        or the image processor's own bound where that is less (it scales larger images
        down to it). What its memory is measured with as the server starts."""
        size = getattr(self.image_processor, "size", None)  # Qwen2-VL's: a pixel count
        if isinstance(size, dict):
            bound = size.get("longest_edge") or size.get("max_pixels")
        else:
            bound = getattr(size, "longest_edge", None)
        bound = bound or getattr(self.image_processor, "max_pixels", None)
        side = math.isqrt(min(max_pixels, int(bound)) if bound else max_pixels)
        return Image.new("RGB", (side, side), (128, 128, 128))

    def placeholder_count(self, image: Image.Image) -> int:
        """The placeholder tokens ``encode`` makes of ``image``, from its size alone
        (the processor's resize; nothing decoded or encoded)."""
        try:
            patches = self.image_processor.get_number_of_image_patches(image.height, image.width)
        except ValueError as error:  # as ``encode`` refuses it
            raise invalid("BAD_IMAGE", f"the image processor refused the image: {error}") from error
        return int(patches) // (self.merge_size * self.merge_size)

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> EncodedImage:
        try:
            features = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as error:  # an image it cannot take (Qwen2-VL: ratio over 200)
            raise invalid("BAD_IMAGE", f"the image processor refused the image: {error}") from error
        stream = torch.cuda.stream(self._stream) if self._stream is not None else None
        with stream if stream is not None else contextlib.nullcontext():
            return self._run_tower(features, image)

    def _run_tower(self, features: Any, image: Image.Image) -> EncodedImage:
        grid_thw = features["image_grid_thw"].to(self.device)  # [1, 3] in patches
        # In the processor's float32: the vision tower casts them to its own dtype, which
        # is float32 on a CPU that emulates 16-bit arithmetic (``cpu_matmul``).
        pixels = features["pixel_values"].to(self.device)
        try:
            output = self.model.model.get_image_features(pixels, grid_thw)
        except Exception as error:
            if not out_of_memory(error):
                raise
            ran_out = str(error)
        else:
            ran_out = ""
        if ran_out:  # out of the handler, whose traceback held the tower's activations
            release_cached_memory()
            raise SalienceError(
                Code.RESOURCE_EXHAUSTED,
                "IMAGE_OUT_OF_MEMORY",
                f"encoding the image ({image.width}x{image.height}, {pixels.shape[0]} patches) "
                "ran out of memory: send a smaller image, or lower --max-image-pixels or "
                "--kv-cache-memory",
            )
        # To the host here, in the caller's thread: the image store keeps them there, and
        # a copy back from a GPU waits for the work queued before it (a whole step),
        # which the store's add would wait for under the engine lock.
        embeds = output.pooler_output[0].cpu()  # [num_tokens, hidden]
        t, h, w = (int(v) for v in grid_thw[0].tolist())
        grid = (t, h // self.merge_size, w // self.merge_size)
        assert grid[0] * grid[1] * grid[2] == embeds.shape[0]
        return EncodedImage(embeds=embeds, grid=grid)
