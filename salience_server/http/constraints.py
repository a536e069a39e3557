"""Structured output: what a request asks for, as the server's ``Constraint``.

Sources, at most one per request: Chat Completions' (and Completions') ``response_format``
(``json_object``, or ``json_schema`` with its ``schema``), Responses' ``text.format``
(the same, flat), and vLLM's extra fields ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` and ``structured_outputs``. A forced tool call
has its own constraint (``ToolMode.constraint``), which takes precedence.

A JSON schema is checked against the JSON Schema meta-schema here, so that a bad one
is a 400 naming the field before any session is touched; the server compiles it (and
answers INVALID_ARGUMENT, ``INVALID_CONSTRAINT``, for what it cannot compile).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import regex  # transformers' own dependency

from salience_server.http.errors import invalid, unsupported
from salience_server.text_checks import load_json

Constraint = tuple[str, str | bool]
"""The server's ``Constraint`` as (kind, value): ``("json_schema", SCHEMA_JSON)``,
``("json_object", True)``, ``("regex", PATTERN)`` or ``("ebnf", GRAMMAR)``."""


def json_schema_text(schema: Any, param: str) -> str:
    """A JSON schema as the JSON text the server takes; 400 unless it is a valid schema."""
    if isinstance(schema, str):
        try:
            schema = load_json(schema)
        except ValueError as error:
            raise invalid(f"the JSON schema is not valid JSON: {error}", param) from None
    if not isinstance(schema, dict | bool):
        raise invalid("a JSON schema must be an object", param, "invalid_json_schema")
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema, format_checker=_schema_formats(validator))
    except jsonschema.SchemaError as error:
        raise invalid(
            f"invalid JSON schema: {error.message}", param, "invalid_json_schema"
        ) from None
    return json.dumps(schema, ensure_ascii=False)


def _schema_formats(validator: Any) -> jsonschema.FormatChecker:
    """The formats a schema's own values are checked for, ``regex`` (its patterns) by
    the ``regex`` module: Python's ``re`` refuses patterns of JSON Schema's dialect
    (``\\p{L}``, ``\\p{Han}``) that the server's grammar engine compiles."""
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(validator.FORMAT_CHECKER.checkers)
    checker.checks("regex", raises=regex.error)(_compiles)
    return checker


def _compiles(pattern: object) -> bool:
    if isinstance(pattern, str):
        regex.compile(pattern)
    return True


def response_format_constraint(value: dict[str, Any] | None) -> Constraint | None:
    """Chat Completions' ``response_format``: ``text`` (none), ``json_object``, or
    ``json_schema`` with ``{"json_schema": {"name", "schema", "strict"}}``."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise invalid(
                "response_format json_schema needs json_schema.schema",
                "response_format.json_schema",
            )
        _check_name(spec.get("name"), "response_format.json_schema.name")
        return "json_schema", json_schema_text(spec["schema"], "response_format.json_schema")
    return _plain_format(kind, "response_format")


def text_format_constraint(text: dict[str, Any] | None) -> Constraint | None:
    """Responses' ``text.format``: ``text`` (none), ``json_object``, or ``json_schema``
    with ``name``, ``schema`` and ``strict`` beside the type."""
    value = (text or {}).get("format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("text.format must be an object", "text.format")
    kind = value.get("type")
    if kind == "json_schema":
        if "schema" not in value:
            raise invalid("text.format json_schema needs a schema", "text.format.schema")
        _check_name(value.get("name"), "text.format.name")
        return "json_schema", json_schema_text(value["schema"], "text.format.schema")
    return _plain_format(kind, "text.format")


def _check_name(name: Any, param: str) -> None:
    """A JSON schema format's ``name``, which OpenAI and vLLM both require."""
    if name is None:
        raise invalid("a json_schema format needs a name", param, "missing_required_parameter")
    if not isinstance(name, str) or not name:
        raise invalid("the json_schema format's name must be a non-empty string", param)


def _plain_format(kind: Any, param: str) -> Constraint | None:
    if kind is None:  # as OpenAI refuses ``{}``
        raise invalid(
            f"{param} needs a type: text, json_object or json_schema",
            f"{param}.type",
            "missing_required_parameter",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", True
    raise unsupported(f"{param} of type {kind!r}", f"{param}.type")


def guided_constraint(fields: dict[str, Any]) -> Sourced | None:
    """vLLM's structured-output fields, from the request's extra fields: the older
    ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and
    ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
    ``json_object``), with the field that gave it (``guided_regex``,
    ``structured_outputs.regex``: what its errors name). A choice becomes a regex
    matching exactly one of the strings. A ``structural_tag`` is refused (400), not
    left unconstrained."""
    given = {
        f"guided_{key}": fields[f"guided_{key}"] for key in _GUIDED if f"guided_{key}" in fields
    }
    outputs = fields.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise invalid("structured_outputs must be an object", "structured_outputs")
        if outputs.get("structural_tag") is not None:
            raise unsupported("a structural_tag", "structured_outputs.structural_tag")
        given |= {
            f"structured_outputs.{key}": outputs[key]
            for key in (*_GUIDED, "json_object")
            if outputs.get(key) is not None
        }
    given = {param: value for param, value in given.items() if value is not None}
    if not given:
        return None
    if len(given) > 1:
        raise invalid(f"give only one structured-output field, not {sorted(given)}", None)
    ((param, value),) = given.items()
    constraint = _guided_value(param, value)
    return None if constraint is None else (param, constraint)


def _guided_value(param: str, value: Any) -> Constraint | None:
    """The constraint of one of vLLM's fields (``param``) with ``value``."""
    key = param.rsplit(".", 1)[-1].removeprefix("guided_")
    if key == "json":
        return "json_schema", json_schema_text(value, param)
    if key == "json_object":
        return ("json_object", True) if value else None
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise invalid("a choice must be a non-empty list of strings", param)
        return "regex", "|".join(f"({regex_literal(choice)})" for choice in value)
    if not isinstance(value, str) or not value:
        raise invalid(f"{param} must be a non-empty string", param)
    if key == "regex":
        return "regex", value
    # vLLM takes GBNF and Lark grammars both; GBNF's rules are defined with "::=".
    return ("ebnf" if "::=" in value else "lark"), value


_GUIDED = ("json", "regex", "choice", "grammar")
_REGEX_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")


def regex_literal(text: str) -> str:
    """A regex matching exactly ``text``: only the metacharacters are escaped, so that
    the pattern reads the same in every regex dialect the grammar engines take."""
    return _REGEX_SPECIAL.sub(r"\\\1", text)


Sourced = tuple[str, Constraint]
"""A constraint and the request field that asked for it (which its errors name)."""


def one_constraint(*sources: tuple[str, Constraint | None]) -> Sourced | None:
    """The one ``(param, constraint)`` among the sources that give one; 400 if several."""
    given = [(param, constraint) for param, constraint in sources if constraint is not None]
    if len(given) > 1:
        params = [param for param, _ in given]
        raise invalid(f"{params[0]} and {params[1]} cannot both constrain the output", params[1])
    return given[0] if given else None
