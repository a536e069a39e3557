"""The committed stubs are exactly what scripts/gen_proto.sh produces from the proto,
but for the generators' version stamps (grpcio-tools' and protobuf's: a machine that
installs a newer patch release of either regenerates the same code stamped otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python_path() -> dict[str, str]:
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


_VERSION_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)[^)]*\)"),
)


def _unstamped(text: str) -> str:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(lambda match: (match.groups() or ("",))[0] + "<version>", text)
    return text


def test_version_stamps_alone_are_left_out() -> None:
    """The comparison ignores the stamps, and nothing else."""
    committed = (ROOT / "salience_client" / "pb" / "salience_pb2_grpc.py").read_text()
    restamped = re.sub(
        r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.9.9'", committed
    )
    assert restamped != committed and _unstamped(restamped) == _unstamped(committed)
    pb2 = (ROOT / "salience_client" / "pb" / "salience_pb2.py").read_text()
    restamped = re.sub(r"Version: \S+", "Version: 9.9.9", pb2).replace("\n    7,", "\n    8,", 1)
    assert restamped != pb2 and _unstamped(restamped) == _unstamped(pb2)
    assert _unstamped(pb2.replace("Session", "Sessions", 1)) != _unstamped(pb2)


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        # PYTHONPATH kept: where the dependencies are a private directory (the GPU check).
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", **_python_path()},
    )
    for name in ("salience_pb2.py", "salience_pb2.pyi", "salience_pb2_grpc.py"):
        committed = (ROOT / "salience_client" / "pb" / name).read_text()
        assert _unstamped((tmp_path / name).read_text()) == _unstamped(committed), (
            f"{name} drifted: run scripts/gen_proto.sh"
        )
