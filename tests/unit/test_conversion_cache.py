"""The conversion cache: what killed conversions leave behind is removed later."""

from __future__ import annotations

import os
import time
from pathlib import Path

from salience_server.engine.loader import STAGING_PREFIX, STALE_STAGING_S, remove_stale_staging


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
