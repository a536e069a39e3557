"""The documentation says what the product does: every command-line option, error
reason, metric and HTTP route is in the README (each was added to the code once without
it), the defaults its synopsis shows are the parsers', and the tests the docs name as
proof exist where they say."""

from __future__ import annotations

import importlib
import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from salience_server.engine.errors import Code
from salience_server.metrics import EngineGauges, Metrics
from tests.client_support import REPO

README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _help(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args([*argv, "--help"])
    return capsys.readouterr().out


def options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", help_text))


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("salience_server.__main__", []),
        ("salience_server.http.__main__", []),
        ("salience_client.cli", []),
        ("salience_client.cli", ["chat"]),
        ("salience_client.cli", ["score"]),
    ],
)
def test_every_option_is_in_the_readme(
    module: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = {flag for flag in options(_help(module, argv, capsys)) if flag not in README}
    assert not missing, f"{module} {' '.join(argv)}: options the README never names"


def synopsis_defaults(readme: str) -> dict[str, str]:
    """``[--flag VALUE]`` of the server's synopsis, where VALUE is a value (not a
    placeholder such as N or SIZE, nor a list of choices)."""
    synopsis = readme.split("`salience-server [", 1)[1].split("` (also", 1)[0]
    pairs = re.findall(r"\[(--[a-z0-9-]+) ([^\]\s]+)\]", synopsis)
    return {flag: value for flag, value in pairs if not value.isupper() and "|" not in value}


def help_defaults(help_text: str) -> dict[str, str]:
    """Each option's default as ``--help`` shows it."""
    flat = " ".join(help_text.split())
    found = re.findall(r"(--[a-z0-9-]+) [A-Z_]+ (?:(?!--[a-z]).)*?\(?default:? ([^\s),]+)", flat)
    return dict(found)


def same_value(written: str, default: str) -> bool:
    try:
        return float(written) == float(default)
    except ValueError:
        return written == default


def test_the_server_synopsis_shows_the_parsers_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    written = synopsis_defaults(README)
    assert len(written) >= 15  # the synopsis was found and read
    defaults = help_defaults(_help("salience_server.__main__", [], capsys))
    wrong = {
        flag: (value, defaults.get(flag))
        for flag, value in written.items()
        if flag != "--speculative" and not same_value(value, defaults.get(flag, ""))
    }
    assert not wrong, "README synopsis value, the parser's default"


def test_a_wrong_synopsis_default_is_seen(capsys: pytest.CaptureFixture[str]) -> None:
    """The check above reads what it must (a broken synopsis fails it)."""
    broken = README.replace("[--max-queue 256]", "[--max-queue 512]")
    defaults = help_defaults(_help("salience_server.__main__", [], capsys))
    assert not same_value(synopsis_defaults(broken)["--max-queue"], defaults["--max-queue"])
    assert same_value(synopsis_defaults(README)["--max-queue"], defaults["--max-queue"])


_RAISED = [
    r"SalienceError\(\s*Code\.(\w+),\s*\"([A-Z_]+)\"",
    r"\binvalid\(\s*()\"([A-Z_]+)\"",  # INVALID_ARGUMENT
    r"_end_failed\(\s*\w+,\s*()\"([A-Z_]+)\"",  # INTERNAL, or the code it names
]


def raised_reasons() -> set[str]:
    """Every ErrorInfo reason the server's code raises."""
    found: set[str] = set()
    for path in (REPO / "salience_server").rglob("*.py"):
        text = path.read_text()
        for pattern in _RAISED:
            found.update(reason for _, reason in re.findall(pattern, text))
    return found


def documented_reasons(readme: str) -> dict[str, str]:
    """The README's error list (the protocol's "Errors carry" item, up to the client's
    own): each reason with the status code it is written under. A code written alone
    is its own reason (UNAUTHENTICATED)."""
    text = readme.split("- Errors carry a `google.rpc.ErrorInfo` reason", 1)[1]
    text = text.split("The Python client adds its own", 1)[0]
    codes = {code.value for code in Code}
    under: dict[str, str] = {}
    depth, code = 0, ""
    for token in re.findall(r"`[^`]*`|[()]", text):
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif re.fullmatch(r"`[A-Z][A-Z_]+`", token):
            name = token.strip("`")
            if depth == 0 and name in codes:
                code = name
                under.setdefault(name, name)
            elif depth > 0:
                under.setdefault(name, code)
    return under


def test_every_error_reason_is_in_the_readmes_error_list() -> None:
    raised = raised_reasons()
    assert {"SESSION_NOT_FOUND", "OUT_OF_MEMORY", "STEP_FAILED"} <= raised  # all forms read
    documented = documented_reasons(README)
    assert not raised - set(documented), "reasons the README's error list leaves out"


def test_each_error_reason_is_listed_under_its_status_code() -> None:
    documented = documented_reasons(README)
    wrong = {}
    for path in (REPO / "salience_server").rglob("*.py"):
        for code, reason in re.findall(_RAISED[0], path.read_text()):
            if documented.get(reason) != code:
                wrong[reason] = (code, documented.get(reason))
    assert not wrong, "reason: (the code raised, the code the README lists it under)"


def test_a_reason_left_out_of_the_readme_is_seen() -> None:
    broken = README.replace("`EMPTY_STOP_STRING`,", "")
    assert "EMPTY_STOP_STRING" in raised_reasons() - set(documented_reasons(broken))
    moved = README.replace("`SESSION_BUSY`, ", "").replace(
        "(`QUEUE_FULL`,", "(`SESSION_BUSY`, `QUEUE_FULL`,"
    )
    assert documented_reasons(moved)["SESSION_BUSY"] == "RESOURCE_EXHAUSTED"


def exposed_metrics() -> dict[str, list[str]]:
    """Each metric as a scrape shows it (a counter's ``_total``), with its labels."""
    metrics = Metrics()
    metrics.watch(
        lambda: EngineGauges(
            num_waiting=0,
            num_running=0,
            sessions_by_residency={"resident": 1},
            num_blocks_used=0,
            num_blocks_free=0,
            host_kv_bytes_used=0,
            num_preemptions=0,
            num_offloaded=0,
            num_dropped=0,
            num_host_kv_dropped=0,
        )
    )
    metrics.requests.labels(rpc="Generate", code="OK").inc()
    exposed = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name.endswith("_created"):  # prometheus_client's own, of each counter
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        exposed[name] = sorted(labels)
    return exposed


def test_every_metric_and_its_labels_are_in_the_readme() -> None:
    exposed = exposed_metrics()
    assert len(exposed) >= 13
    missing = [name for name in exposed if not re.search(rf"`{name}[`{{]", README)]
    assert not missing, "metrics the README does not name"
    for name, labels in exposed.items():
        if labels:
            written = re.search(rf"`{name}\{{([^}}]*)\}}`", README)
            assert written, f"{name}: its labels {labels} are not written"
            assert sorted(part.split("=")[0] for part in written.group(1).split(",")) == labels


def test_every_http_route_is_in_the_readme() -> None:
    from salience_server.http.app import create_app
    from salience_server.http.config import ShimConfig

    routes = [*create_app(ShimConfig()).openapi()["paths"], "/metrics"]
    assert "/v1/chat/completions" in routes
    missing = []
    for path in routes:
        written = re.escape(path)
        pattern = re.sub(r"\\\{\w+\\\}", r"\\{\\w+\\}", written)
        if not re.search(rf"{pattern}(?![\w/])", README):
            missing.append(path)
    assert not missing, "routes the README does not name"


def test_the_tests_the_docs_name_exist_where_they_say() -> None:
    """A guarantee's proof is a test named in the docs; a renamed or moved test left
    the reader looking in the wrong file."""
    defined: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        for name in re.findall(r"def (test_\w+)", path.read_text()):
            defined.setdefault(name, set()).add(path.name)
    wrong = []
    for doc in DOCS:
        for file, name in re.findall(r"(test_\w+\.py)?::(test_\w+)", doc.read_text()):
            if name not in defined or (file and file not in defined[name]):
                wrong.append(f"{doc.name}: {file}::{name} (in {sorted(defined.get(name, []))})")
    assert not wrong


def test_paths_the_docs_name_exist() -> None:
    wrong = []
    pattern = r"(?<![\w/.])((?:tests|scripts|benchmarks|deploy|salience_server|salience_client"
    pattern += r"|examples|docs|proto)/[\w./-]*\w)"
    for doc in DOCS:
        for path in set(re.findall(pattern, doc.read_text())):
            if not (REPO / path).exists() and not (doc.parent / path).exists():
                wrong.append(f"{doc.name}: {path}")
    assert not wrong


def environment_variables() -> set[str]:
    """The variables the product reads or sets: the names (``A_B``) in its modules that
    touch ``os.environ``."""
    found: set[str] = set()
    for package in ("salience_server", "salience_client"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if "os.environ" in text:
                found.update(re.findall(r"\"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\"", text))
    return found


def test_every_environment_variable_is_documented() -> None:
    names = environment_variables()
    assert {"SALIENCE_API_KEY", "SALIENCE_CACHE_DIR", "LRU_CACHE_CAPACITY"} <= names
    docs = "".join(doc.read_text() for doc in DOCS)
    assert not {name for name in names if name not in docs}, "variables no doc names"
