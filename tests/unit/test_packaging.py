"""What the built packages carry beyond their modules."""

from __future__ import annotations

import tomllib
from importlib.resources import files

from tests.client_support import REPO


def test_the_client_ships_its_type_hints() -> None:
    """PEP 561's marker is in the client package and in its package data, so that a type
    checker reads the client's annotations once it is installed (they were invisible)."""
    assert files("salience_client").joinpath("py.typed").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["salience_client"]
