"""A tool's parameters as a JSON schema: placed inside a forced call's schema
(``rooted_at``), and a forced call's arguments checked against it (``argument_problem``).
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import regex  # transformers' own dependency

from salience_server.http.errors import ApiError
from salience_server.text_checks import load_json

_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
"""JSON Schema keywords whose value maps names to subschemas."""
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
"""...whose value is a list of subschemas."""
_SCHEMA_VALUES = {
    "items",
    "additionalItems",
    "additionalProperties",
    "contains",
    "contentSchema",
    "else",
    "if",
    "not",
    "propertyNames",
    "then",
    "unevaluatedItems",
    "unevaluatedProperties",
}
"""...whose value is a subschema. Other keywords' values (``const``, ``enum``,
``default``, ``examples``) are data, never read as schemas."""


def rooted_at(schema: Any, where: str) -> Any:
    """``schema`` with its local references (``#``, ``#/...``) made to point below
    ``where``, where it is to be placed; its ``$schema`` dropped (only a root has one).
    Only schema positions are read: a property named ``$schema``, or ``$ref`` in a
    ``const``, is data."""
    if not isinstance(schema, dict):
        return schema
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            moved[key] = where + value[1:]
        elif key == "$schema":
            continue
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            moved[key] = {name: rooted_at(item, where) for name, item in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            moved[key] = [rooted_at(item, where) for item in value]
        elif key in _SCHEMA_VALUES:
            moved[key] = rooted_at(value, where)
        elif key == "dependencies" and isinstance(value, dict):  # draft-07: schemas or names
            moved[key] = {name: rooted_at(item, where) for name, item in value.items()}
        else:
            moved[key] = value
    return moved


def argument_problem(arguments: str, schema: dict[str, Any]) -> str | None:
    """Why JSON-text ``arguments`` do not match ``schema``; None when they do. Patterns
    are JSON Schema's dialect (``\\p{L}``), read by the ``regex`` module as the schema's
    check at the door reads them; where ``jsonschema`` itself still meets one that
    Python's ``re`` refuses (``patternProperties`` beside ``additionalProperties``),
    the arguments pass: the grammar engine kept them to the schema."""
    try:
        value = load_json(arguments)
    except ValueError as error:
        return f"are not JSON ({error})"
    validator = _with_schema_patterns(jsonschema.validators.validator_for(schema))(schema)
    try:
        mismatch = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except re.error:
        return None
    return None if mismatch is None else f"do not match the schema: {mismatch.message}"


def _with_schema_patterns(validator: Any) -> Any:
    """``validator`` with ``pattern`` and ``patternProperties`` matched by the ``regex``
    module (``jsonschema``'s own use Python's ``re``, which refuses ``\\p{L}``)."""
    return jsonschema.validators.extend(
        validator, {"pattern": _pattern, "patternProperties": _pattern_properties}
    )


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and not regex.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if regex.search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def constraint_broken(what: str) -> ApiError:
    """500: the server's output broke the constraint the shim asked for."""
    return ApiError(
        500,
        f"The server did not keep to the forced tool call's schema: {what}",
        "server_error",
        code="constraint_violated",
    )
