"""The committed stubs are exactly what scripts/gen_proto.sh produces from the proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python_path() -> dict[str, str]:
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        # PYTHONPATH kept: where the dependencies are a private directory (the GPU check).
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", **_python_path()},
    )
    for name in ("salience_pb2.py", "salience_pb2.pyi", "salience_pb2_grpc.py"):
        committed = (ROOT / "salience_client" / "pb" / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"{name} drifted: run scripts/gen_proto.sh"
        )
