"""The JSON checks on clients' text: a large body is scanned, not walked, where its text
cannot hold what they look for (a lone surrogate, NaN or infinity), and the scan never
lets one through. Oracle: the walk over the decoded value alone."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salience_server import text_checks
from salience_server.text_checks import lone_surrogate_path, non_finite_path

WHOLE = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("123456789"),
    st.text("0123456789", max_size=320),
)
FLOAT_LITERALS = st.builds(
    lambda whole, fraction, exponent: f"{whole}.{fraction}e{exponent}",
    WHOLE,
    st.integers(min_value=0, max_value=10**5),
    st.integers(min_value=-99, max_value=99) | st.integers(min_value=-400, max_value=400),
) | st.floats(allow_nan=True, allow_infinity=True).map(json.dumps)
TEXTS = st.text(
    st.sampled_from(["a", "\u00e9", "\ud800", "\udbff", "\udc00", "\udfff", "\U0001f600"])
)


@pytest.mark.parametrize(
    "literal",
    ["NaN", "-Infinity", "1e400", "1E+309", "1" + "0" * 250 + ".5e99", "9" * 309 + ".0", "1e308"],
)
def test_each_way_json_writes_an_infinity_is_seen(literal: str) -> None:
    raw = f'{{"values": [1, {literal}]}}'
    value = json.loads(raw)
    walked = non_finite_path(value)
    assert walked == ("values[1]" if literal != "1e308" else None)
    assert non_finite_path(value, raw) == non_finite_path(value, raw.encode()) == walked


@pytest.mark.parametrize("surrogate", ["\ud800", "\udbff", "\udc00", "\udfff"])
def test_each_lone_surrogate_is_seen(surrogate: str) -> None:
    raw = json.dumps({"messages": ["a", f"b{surrogate}"]})
    value = json.loads(raw)
    assert lone_surrogate_path(value) == "messages[1]"
    assert lone_surrogate_path(value, raw) == lone_surrogate_path(value, raw.encode())
    assert lone_surrogate_path(value, raw) == "messages[1]"


@settings(max_examples=300)  # milliseconds each
@given(st.lists(FLOAT_LITERALS | st.integers().map(str), max_size=4))
def test_the_scan_misses_no_nan_or_infinity(literals: list[str]) -> None:
    raw = f'{{"values": [{", ".join(literals)}], "model": "m"}}'
    value = json.loads(raw)
    walked = non_finite_path(value)
    assert non_finite_path(value, raw) == walked
    assert non_finite_path(value, raw.encode()) == walked


@settings(max_examples=300)
@given(st.lists(TEXTS, max_size=4))
def test_the_scan_misses_no_lone_surrogate(texts: list[str]) -> None:
    raw = json.dumps({"messages": texts, "key": "value"})  # surrogates escaped: \udXXX
    value = json.loads(raw)
    walked = lone_surrogate_path(value)
    assert lone_surrogate_path(value, raw) == walked
    assert lone_surrogate_path(value, raw.encode()) == walked


def test_a_body_of_token_ids_is_not_walked(monkeypatch) -> None:
    """Millions of token ids took seconds to walk, twice, before a body was validated."""
    walks: list[object] = []
    monkeypatch.setattr(text_checks, "_first_path", lambda *args: walks.append(args))
    raw = json.dumps({"model": "m", "input": [[5, 6]] * 1000, "temperature": 0.5}).encode()
    value = json.loads(raw)
    assert lone_surrogate_path(value, raw) is None and non_finite_path(value, raw) is None
    assert walks == []
