"""The conversion cache: a GGUF file dequantized once into a safetensors directory under
``$SALIENCE_CACHE_DIR`` (default ``~/.cache/salience``), keyed by the file's content and
shared by every process and checkout that loads it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    explicit = os.environ.get("SALIENCE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "salience"


def convert_gguf(gguf_path: Path, check: Callable[[Path], None] | None = None) -> Path:
    """Dequantizes ``gguf_path`` once into a cached safetensors directory; returns it.
    ``check`` runs on the file before it is converted (not when a conversion is cached):
    what it raises costs no conversion.
    The cache is keyed by the file's content, so every copy of one GGUF (the default
    model in each new environment or checkout, under any name) shares one conversion.
    Processes starting together convert once: the others wait for it (a lock file per
    conversion), and staging left by a conversion that was killed is removed then."""
    digest = content_digest(gguf_path)[:12]
    models_dir = cache_dir() / "models"
    cached = _converted(models_dir, digest)
    if cached is not None:
        return _reused(cached)
    target = models_dir / f"{gguf_path.stem}-{digest}"
    with _conversion_lock(models_dir, digest):
        cached = _converted(models_dir, digest)
        if cached is not None:  # another process converted it while this one waited
            return _reused(cached)
        if check is not None:
            check(gguf_path)
        log.info("converting %s to safetensors (once) into %s", gguf_path, target)
        staging = _staging_dir(models_dir, digest, target)  # before the minutes of converting
        try:
            _convert_read(gguf_path, staging)
            for path in staging.iterdir():
                path.chmod(0o644)  # safetensors writes its files 0600: share them as the rest
            staging.rename(target)  # atomic: a crash never leaves half a cache behind
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("converted model saved at %s", target)
    return target


def _reused(cached: Path) -> Path:
    """A cached conversion, its files readable by every user of the cache: those this
    user converted before conversions were shared (0600, as safetensors writes them)
    are made 0644; another user's are left as they are."""
    log.info("using the converted model cached at %s", cached)
    for path in cached.iterdir():
        try:
            info = path.stat()
            if info.st_uid == os.getuid() and info.st_mode & 0o044 != 0o044:
                path.chmod(info.st_mode | 0o044)
        except OSError:  # a read-only cache, a file gone meanwhile: used as it is
            continue
    return cached


def _converted(models_dir: Path, digest: str) -> Path | None:
    """The finished conversion of the GGUF whose digest starts with ``digest``, under
    whatever file name it was converted."""
    for path in sorted(models_dir.glob(f"*-{digest}")):
        if not path.name.startswith(STAGING_PREFIX) and (path / "config.json").exists():
            return path
    return None


@contextlib.contextmanager
def _conversion_lock(models_dir: Path, digest: str) -> Iterator[None]:
    """Held while converting the GGUF whose digest starts with ``digest``, under any of
    its names: a second process waits here rather than convert it again (and then fail
    to rename its copy over the first). The lock goes with its process, however that
    ends; its file is opened read-only, so that users sharing the cache share it."""
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(models_dir / f".{digest}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as error:
        raise OSError(
            f"cannot write the converted model under {models_dir} ({error}); "
            "set SALIENCE_CACHE_DIR to a writable directory"
        ) from error
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting this model; waiting for it")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _staging_dir(models_dir: Path, digest: str, target: Path) -> Path:
    """A fresh directory to convert into, beside the caches, after removing what killed
    conversions of this GGUF left (under its lock, none is in use) and a ``target``
    that is no finished conversion (its config gone: the rename onto it would fail);
    an unwritable cache is an error that says what to do."""
    try:
        remove_stale_staging(models_dir, digest)
        if target.is_dir() and not target.is_symlink():
            log.warning("removing %s, a conversion with files missing", target)
            shutil.rmtree(target)
        elif target.is_symlink() or target.exists():
            target.unlink()
        staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f"{STAGING_PREFIX}{digest}-"))
        staging.chmod(0o755)  # mkdtemp's 0700 kept other users from a shared cache
        return staging
    except OSError as error:
        raise OSError(
            f"cannot write the converted model under {models_dir} ({error}); "
            "set SALIENCE_CACHE_DIR to a writable directory"
        ) from error


def _convert_read(gguf_path: Path, directory: Path) -> None:
    """``_convert_into``, with a file it cannot read (truncated, not a model) a one-line
    ValueError naming it."""
    try:
        with readable_gguf(gguf_path) as readable:
            _convert_into(readable, directory)
    except Exception as error:
        log.debug("converting %s failed", gguf_path, exc_info=True)
        unread = "architecture" in str(error) and "not supported" in str(error)
        hint = (
            "transformers does not read this architecture from GGUF"
            if unread
            else "is the file a complete GGUF model?"
        )
        raise ValueError(f"cannot convert {gguf_path} ({in_one_line(error)}); {hint}") from error


@contextlib.contextmanager
def readable_gguf(gguf_path: Path) -> Iterator[Path]:
    """``gguf_path``, or a link to it named ``.gguf`` while the block runs: transformers
    reads a file as GGUF by its suffix (a file named by its digest, as Ollama's blobs,
    or ``.GGUF``, it took for a torch checkpoint)."""
    if gguf_path.suffix == ".gguf":
        yield gguf_path
        return
    with tempfile.TemporaryDirectory() as linked:
        link = Path(linked) / f"{gguf_path.name}.gguf"
        link.symlink_to(gguf_path.resolve())
        yield link


def in_one_line(error: BaseException) -> str:
    """An error's type and the first line of its message (a library's may run on)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


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
"""In the models cache: each file hashed so far, by resolved path, with its size,
inode and modification and change times then, so a file is read whole once, not at
every start."""


def content_digest(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, hashed once per (path, size, inode, times) and
    remembered in the cache's ``DIGESTS_FILE`` (about a second a GB)."""
    stat = path.stat()
    name = str(path.resolve())
    index_path = cache_dir() / "models" / DIGESTS_FILE
    index = _read_digests(index_path)
    known = index.get(name)
    # The inode and change time too: a copy that keeps the size and modification time
    # (rsync -a, cp -p of another model over it) is a new file, its ctime new.
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    seen |= {"ino": stat.st_ino, "ctime_ns": stat.st_ctime_ns}
    if known and all(known.get(key) == value for key, value in seen.items()):
        return str(known["sha256"])
    log.info("hashing %s (%.0f MB) to find its conversion", path, stat.st_size / 2**20)
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    index = {key: value for key, value in index.items() if Path(key).exists()}
    index[name] = {**seen, "sha256": digest}
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


def remove_stale_staging(models_dir: Path, digest: str = "") -> None:
    """Removes what killed conversions left in ``models_dir`` (never a finished cache:
    those are renamed out of staging): all staging of the GGUF ``digest`` names, whose
    lock the caller holds, and any other staging untouched for ``STALE_STAGING_S``."""
    now = time.time()
    for path in models_dir.glob(f"{STAGING_PREFIX}*"):
        is_mine = bool(digest) and path.name.startswith(f"{STAGING_PREFIX}{digest}-")
        if path.is_dir() and (is_mine or now - path.stat().st_mtime > STALE_STAGING_S):
            log.info("removing %s, left by a conversion that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
