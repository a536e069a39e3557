"""What the built packages carry beyond their modules."""

from __future__ import annotations

import re
import tomllib
from importlib.resources import files

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.client_support import REPO


def test_the_client_ships_its_type_hints() -> None:
    """PEP 561's marker is in the client package and in its package data, so that a type
    checker reads the client's annotations once it is installed (they were invisible)."""
    assert files("salience_client").joinpath("py.typed").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["salience_client"]


_STUBS = REPO / "salience_client" / "pb"


def _specifiers() -> dict[str, SpecifierSet]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(req.name): req.specifier for req in requirements}


def _floor(specifier: SpecifierSet) -> Version | None:
    """The lowest release a specifier names as allowed (None when it has no lower bound)."""
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=", "===")]
    return max(floors, default=None)


def _grpc_stamp() -> Version:
    text = (_STUBS / "salience_pb2_grpc.py").read_text()
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", text, re.MULTILINE)
    assert match, "salience_pb2_grpc.py has no GRPC_GENERATED_VERSION"
    return Version(match.group(1))


def _protobuf_stamp() -> Version:
    text = (_STUBS / "salience_pb2.py").read_text()
    match = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
        r"\s*(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'",
        text,
    )
    assert match, "salience_pb2.py does not validate its protobuf runtime"
    major, minor, patch, suffix = match.groups()
    stamp = Version(f"{major}.{minor}.{patch}{suffix}")
    comment = re.search(r"^# Protobuf Python Version: (\S+)$", text, re.MULTILINE)
    assert comment and Version(comment.group(1)) == stamp
    return stamp


@pytest.mark.parametrize("name", ["grpcio", "grpcio-tools"])
def test_the_grpc_floors_are_the_stubs_generator(name: str) -> None:
    """The committed stubs refuse at import a grpcio older than the grpcio-tools that
    generated them (a RuntimeError naming GRPC_GENERATED_VERSION), and grpcio-tools
    regenerates them (scripts/gen_proto.sh): neither may be declared below that version
    (both were >=1.62 with stubs from 1.85.1)."""
    stamp, specifier = _grpc_stamp(), _specifiers()[name]
    floor = _floor(specifier)
    assert floor is not None and floor >= stamp, (
        f"{name}{specifier} admits releases older than {stamp}"
    )
    assert specifier.contains(stamp)


def test_the_protobuf_bounds_hold_the_stubs_gencode() -> None:
    """salience_pb2.py calls ValidateProtobufRuntimeVersion, which refuses a runtime older
    than the gencode; protobuf supports gencode of major V on runtimes V and V+1 only
    (its cross-version runtime guarantee), so the bound must stop below V+2."""
    stamp, specifier = _protobuf_stamp(), _specifiers()["protobuf"]
    floor = _floor(specifier)
    assert floor is not None and floor >= stamp, (
        f"protobuf{specifier} admits runtimes older than {stamp}"
    )
    assert specifier.contains(stamp)
    beyond = stamp.major + 2
    for version in (f"{beyond}.0.0", f"{beyond}.{stamp.minor}.{stamp.micro}", f"{beyond + 3}.0.0"):
        assert not specifier.contains(version), f"protobuf{specifier} admits {version}"
