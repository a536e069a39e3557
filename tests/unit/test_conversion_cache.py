"""The conversion cache: keyed by content, and what killed conversions leave behind is
removed later."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from salience_server.engine import conversion
from salience_server.engine.conversion import (
    DIGESTS_FILE,
    STAGING_PREFIX,
    STALE_STAGING_S,
    content_digest,
    convert_gguf,
    remove_stale_staging,
)
from salience_server.engine.loader import default_gguf_path
from tests.gguf_models import build_tiny_gguf


def test_stale_staging_is_removed_and_fresh_staging_and_caches_are_kept(tmp_path: Path) -> None:
    stale = tmp_path / f"{STAGING_PREFIX}old"
    fresh = tmp_path / f"{STAGING_PREFIX}new"  # another process converting right now
    cache = tmp_path / "SmolLM2-135M-Instruct.Q4_1-f9b8cb2c99ca"
    for directory in (stale, fresh, cache):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"weights")
    long_ago = time.time() - STALE_STAGING_S - 60
    for path in (stale, cache):
        os.utime(path, (long_ago, long_ago))
    remove_stale_staging(tmp_path)
    assert not stale.exists()
    assert (fresh / "model.safetensors").exists() and (cache / "model.safetensors").exists()


def test_a_file_is_keyed_by_its_content_and_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    hashed: list[str] = []
    file_digest = hashlib.file_digest

    def counting(file: Any, name: str) -> Any:
        hashed.append(file.name)
        return file_digest(file, name)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    content = bytes(range(256)) * 4096
    original, copy = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (original, copy):
        path.parent.mkdir()
        path.write_bytes(content)
    want = hashlib.sha256(content).hexdigest()
    assert content_digest(original) == content_digest(copy) == want
    assert content_digest(original) == want and len(hashed) == 2  # remembered
    assert json.loads((tmp_path / "cache" / "models" / DIGESTS_FILE).read_text()).keys() == {
        str(original.resolve()),
        str(copy.resolve()),
    }
    copy.write_bytes(content[:-1] + b"x")  # another model: hashed again, another key
    changed = content_digest(copy)
    assert changed == hashlib.sha256(content[:-1] + b"x").hexdigest() != want
    assert len(hashed) == 3
    # Another model of the same size copied over it keeping the time (rsync -a, cp -p):
    # a new inode and change time, hashed again (the size and mtime alone matched).
    other = tmp_path / "other.gguf"
    other.write_bytes(content[:-1] + b"y")
    os.utime(other, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns))
    os.replace(other, copy)
    assert content_digest(copy) == hashlib.sha256(content[:-1] + b"y").hexdigest()
    assert len(hashed) == 4
    copy.unlink()  # a file gone is forgotten at the next write
    (tmp_path / "cache" / "models" / DIGESTS_FILE).write_text("{damaged")
    assert content_digest(original) == want and len(hashed) == 5
    index = json.loads((tmp_path / "cache" / "models" / DIGESTS_FILE).read_text())
    assert list(index) == [str(original.resolve())]
    assert not list((tmp_path / "cache" / "models").glob(".digests-*"))


@pytest.mark.skipif("not __import__('tests.conftest').conftest.default_model_available()")
def test_a_copy_of_the_default_model_uses_its_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new environment or checkout holds its own copy of the default GGUF: it must not
    convert (and store) the model again."""
    converted = convert_gguf(default_gguf_path())
    copy = tmp_path / default_gguf_path().name
    shutil.copyfile(default_gguf_path(), copy)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    assert convert_gguf(copy) == converted


def test_an_unwritable_cache_fails_before_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It failed after the minutes of converting, with a bare errno message."""
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(blocker / "cache"))  # under a file

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converting before the cache was known to be writable")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OSError, match="SALIENCE_CACHE_DIR"):
        convert_gguf(gguf)


def _fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "m.gguf") -> Path:
    """A GGUF stand-in, with the conversion itself replaced: it records its calls and
    writes a config."""
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / name
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    return gguf


def _recording_conversion(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    converted: list[Path] = []

    def convert_into(gguf_path: Path, directory: Path) -> None:
        converted.append(gguf_path)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(conversion, "_convert_into", convert_into)
    return converted


def test_a_copy_under_another_name_uses_the_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache was keyed by the file's name and content: a copy renamed converted the
    model again (another 517 MB for the default one)."""
    gguf = _fake_gguf(tmp_path, monkeypatch)
    converted = _recording_conversion(monkeypatch)
    first = convert_gguf(gguf)
    renamed = tmp_path / "elsewhere" / "renamed.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(gguf, renamed)
    assert convert_gguf(renamed) == first and converted == [gguf]


def test_a_start_while_another_converts_waits_and_uses_its_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers started together on an empty cache both converted, and the second's
    rename over the first's finished cache failed (it exited 1 after a minute). The
    second waits, even for a copy of the file under another name (its lock is the
    content's, not the name's)."""
    gguf = _fake_gguf(tmp_path, monkeypatch)
    renamed = tmp_path / "renamed.gguf"
    shutil.copyfile(gguf, renamed)
    converted = _recording_conversion(monkeypatch)
    models = tmp_path / "cache" / "models"
    digest = content_digest(gguf)[:12]
    target = models / f"m-{digest}"
    result: list[Path] = []
    waiter = threading.Thread(target=lambda: result.append(convert_gguf(renamed)))
    with conversion._conversion_lock(models, digest):  # the first process, converting
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and result == []  # waiting, not converting
        target.mkdir()
        (target / "config.json").write_text("{}")  # the first one's conversion lands
    waiter.join(10)
    assert result == [target] and converted == []


def test_staging_a_killed_conversion_left_is_removed_by_the_next_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It stayed for good once a later start converted (only staging older than an hour
    was removed, and only when a conversion started): 363 MB after one SIGINT."""
    gguf = _fake_gguf(tmp_path, monkeypatch)
    converted = _recording_conversion(monkeypatch)
    models = tmp_path / "cache" / "models"
    digest = content_digest(gguf)[:12]
    left = models / f"{STAGING_PREFIX}{digest}-killed"  # young: killed a moment ago
    other = models / f"{STAGING_PREFIX}123456789abc-live"  # another model's, converting
    for directory in (left, other):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"half")
    assert convert_gguf(gguf) == models / f"m-{digest}" and converted == [gguf]
    assert not left.exists() and (other / "model.safetensors").exists()
    assert not list(models.glob(f"{STAGING_PREFIX}{digest}-*"))


def test_a_conversion_is_readable_by_every_user_of_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is shared (its directories 0755, its lock and index readable by all),
    but safetensors wrote the converted weights 0600: another user's server sharing the
    cache found the conversion and failed to read it."""
    monkeypatch.setenv("SALIENCE_CACHE_DIR", str(tmp_path / "cache"))
    converted = convert_gguf(build_tiny_gguf(tmp_path / "tiny.gguf", quant="Q8_0"))
    files = sorted(path.name for path in converted.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    modes = {path.name: path.stat().st_mode & 0o777 for path in converted.iterdir()}
    assert modes == dict.fromkeys(files, 0o644)


def test_a_conversion_cached_unreadable_to_others_is_shared_when_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conversions made before they were shared kept their 0600 weights until converted
    again: another user's server found them and failed to read them. Using one makes
    its files readable by all (a file already readable keeps its mode)."""
    gguf = _fake_gguf(tmp_path, monkeypatch)
    converted = _recording_conversion(monkeypatch)
    target = tmp_path / "cache" / "models" / f"m-{content_digest(gguf)[:12]}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "model.safetensors").chmod(0o600)
    (target / "config.json").chmod(0o664)
    assert convert_gguf(gguf) == target and converted == []
    modes = {path.name: path.stat().st_mode & 0o777 for path in target.iterdir()}
    assert modes == {"config.json": 0o664, "model.safetensors": 0o644}


def test_a_conversion_with_its_config_gone_is_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached conversion that lost files (its config.json) is no conversion: the GGUF
    was converted again, and every start failed renaming it onto the old one ("Directory
    not empty")."""
    gguf = _fake_gguf(tmp_path, monkeypatch)
    converted = _recording_conversion(monkeypatch)
    target = tmp_path / "cache" / "models" / f"m-{content_digest(gguf)[:12]}"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"weights")
    assert convert_gguf(gguf) == target and converted == [gguf]
    assert sorted(path.name for path in target.iterdir()) == ["config.json"]
    assert convert_gguf(gguf) == target and converted == [gguf]  # once
    shutil.rmtree(target)
    target.symlink_to(tmp_path / "gone")  # a link left dangling: replaced, its target kept
    assert convert_gguf(gguf) == target and converted == [gguf, gguf]
    assert not target.is_symlink() and (target / "config.json").exists()
