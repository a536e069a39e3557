"""Every tensor the engine makes names its device.

On CPU every tensor is a host tensor, so a tensor made on the host and combined with the
model's on a GPU fails only there: the first GPU run found one (a step without readout
made its empty readout buffer on the host, and the step's one device-to-host copy
refused it). This reads the engine's code for tensor factories that name no device."""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from salience_server.engine.engine_thread import EngineThread
from salience_server.engine.loader import resolve_device

ENGINE = Path(__file__).resolve().parents[2] / "salience_server" / "engine"
FACTORIES = {
    "tensor",
    "as_tensor",
    "empty",
    "zeros",
    "ones",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "linspace",
    "eye",
    "Generator",
}
ON_THE_HOST = {("uploads.py", "send")}
"""Made on the host by design: the step's integer inputs, before their one copy."""


def _factories_without_device(path: Path) -> list[tuple[str, int, str]]:
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if (path.name, function.name) in ON_THE_HOST:
            continue
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(keyword.arg == "device" for keyword in node.keywords)
            ):
                found.append((path.name, node.lineno, ast.unparse(node)))
    return found


def test_the_engine_names_the_device_of_every_tensor_it_makes() -> None:
    found = sorted({f for path in ENGINE.glob("*.py") for f in _factories_without_device(path)})
    assert not found, "tensors made without a device (pass device=...):\n" + "\n".join(
        f"{name}:{line}: {code}" for name, line, code in found
    )


def test_the_check_finds_a_factory_without_a_device(tmp_path: Path) -> None:
    source = tmp_path / "step.py"
    source.write_text(
        "import torch\n"
        "def rows(logits):\n"
        "    placed = torch.empty(0, 0, device=logits.device)\n"
        "    return torch.cat([placed, torch.empty(0, 0)])\n"
    )
    assert _factories_without_device(source) == [("step.py", 4, "torch.empty(0, 0)")]


def test_a_device_the_server_cannot_run_on_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--device`` that torch cannot parse, an index past the GPUs, or a kind of
    device the engine was never built for: one line naming the flag (torch's own
    RuntimeError went out as a stack trace, and ``cuda:3`` failed at the first tensor)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    for name, message in [
        ("cuda:x", "--device 'cuda:x' is not a device (try cpu, cuda or cuda:1)"),
        ("tpu", "--device 'tpu' is not a device (try cpu, cuda or cuda:1)"),
        ("cuda:2", "--device cuda:2: this machine has 2 GPU(s)"),
        ("mps", "--device mps: Salience runs on cpu or cuda"),
    ]:
        with pytest.raises(ValueError) as refused:
            resolve_device(name)
        assert str(refused.value) == message


def test_the_engine_thread_makes_the_models_gpu_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread's current CUDA device starts as GPU 0: for a model on ``cuda:1`` the
    engine thread's pinned memory (the step's inputs) made a context on GPU 0 too."""
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    idle = SimpleNamespace(has_work=lambda: False, requests=lambda: [], running=[], waiting=[])
    table = SimpleNamespace(expire=lambda ttl: None)
    for device, want in (
        (torch.device("cuda", 1), [torch.device("cuda", 1)]),
        (torch.device("cpu"), []),
    ):
        thread = EngineThread(
            threading.Condition(),
            idle,
            table,
            outcomes=None,
            step=lambda: None,
            session_ttl_s=0,
            device=device,
        )
        thread.start()
        thread.stop()
        assert made_current == want
        made_current.clear()
