"""A tool's parameters placed inside a forced call's schema (``rooted_at``), and a
forced call's arguments checked against them (``argument_problem``).

Oracle: the JSON Schema specification's meaning of each keyword, and ``jsonschema``'s
own verdict where Python's ``re`` reads the pattern."""

from __future__ import annotations

import jsonschema
import pytest

from salience_server.http.tool_schema import argument_problem, rooted_at

WHERE = "#/$defs/tool_0"


def test_local_references_move_below_where_the_schema_is_placed() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/Point"}, "self": {"$ref": "#"}},
        "$defs": {"Point": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Point"}}},
        "anyOf": [{"$ref": "#/$defs/Point"}],
        "items": {"$ref": "#/$defs/Point"},
    }
    moved = rooted_at(schema, WHERE)
    assert "$schema" not in moved  # only a root has one
    assert moved["properties"] == {
        "p": {"$ref": WHERE + "/$defs/Point"},
        "self": {"$ref": WHERE},
    }
    assert moved["$defs"]["Point"]["additionalProperties"] == {"$ref": WHERE + "/$defs/Point"}
    assert moved["anyOf"] == [{"$ref": WHERE + "/$defs/Point"}]
    assert moved["items"] == {"$ref": WHERE + "/$defs/Point"}


def test_data_and_remote_references_stay_as_they_are() -> None:
    """``const``, ``enum`` and ``default`` hold data, however it looks; a property named
    ``$schema`` is a property; a reference to another document is not local."""
    schema = {
        "properties": {"$schema": {"type": "string"}, "r": {"$ref": "other.json#/x"}},
        "const": {"$ref": "#/a", "$schema": "kept"},
        "enum": [{"$ref": "#"}],
        "default": {"$ref": "#/b"},
    }
    moved = rooted_at(schema, WHERE)
    assert moved == schema


def test_draft_07_dependencies_move_schemas_and_keep_names() -> None:
    schema = {"dependencies": {"a": {"$ref": "#/definitions/B"}, "c": ["d", "e"]}}
    assert rooted_at(schema, WHERE) == {
        "dependencies": {"a": {"$ref": WHERE + "/definitions/B"}, "c": ["d", "e"]}
    }


def test_a_placed_schema_validates_as_it_did_at_its_root() -> None:
    """The oracle: the tool's schema at its root, and placed under ``$defs`` of a call
    schema, accept and refuse the same arguments."""
    tool = {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/Point"}},
        "required": ["p"],
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
    call = {"$ref": WHERE, "$defs": {"tool_0": rooted_at(tool, WHERE)}}
    for value in ({"p": {"x": 1}}, {"p": {"x": "one"}}, {}, {"p": 3}):
        at_root = jsonschema.Draft202012Validator(tool).is_valid(value)
        placed = jsonschema.Draft202012Validator(call).is_valid(value)
        assert at_root == placed, value


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ('{"city": "Oslo"}', None),
        ('{"city": 3}', "do not match the schema: 3 is not of type 'string'"),
        ("{}", "do not match the schema: 'city' is a required property"),
    ],
)
def test_arguments_are_checked_against_the_tools_schema(arguments: str, problem: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert argument_problem(arguments, schema) == problem


def test_arguments_that_are_not_json_say_so() -> None:
    problem = argument_problem('{"city": ', {"type": "object"})
    assert problem is not None and problem.startswith("are not JSON (")


def test_patterns_are_json_schemas_dialect() -> None:
    """``\\p{L}`` (a letter), which Python's ``re`` refuses, in ``pattern`` and in
    ``patternProperties``: matched, and a mismatch reported."""
    letters = {"type": "string", "pattern": r"^\p{L}+$"}
    assert argument_problem('"Zürich"', letters) is None
    assert "does not match" in (argument_problem('"Zürich1"', letters) or "")
    keyed = {"type": "object", "patternProperties": {r"^\p{L}+$": {"type": "integer"}}}
    assert argument_problem('{"größe": 3, "1": "x"}', keyed) is None
    problem = argument_problem('{"größe": "three"}', keyed)
    assert problem == "do not match the schema: 'three' is not of type 'integer'"


def test_a_pattern_only_python_re_reads_passes() -> None:
    """``additionalProperties`` beside ``patternProperties`` is judged by ``jsonschema``
    itself with Python's ``re``, which refuses ``\\p{L}``: the arguments pass (the
    grammar engine held them to the schema)."""
    schema = {
        "type": "object",
        "patternProperties": {r"^\p{L}+$": {"type": "integer"}},
        "additionalProperties": False,
    }
    assert argument_problem('{"größe": 3}', schema) is None
