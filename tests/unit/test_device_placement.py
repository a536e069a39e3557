"""Every tensor the engine makes names its device.

On CPU every tensor is a host tensor, so a tensor made on the host and combined with the
model's on a GPU fails only there: the first GPU run found one (a step without readout
made its empty readout buffer on the host, and the step's one device-to-host copy
refused it). This reads the engine's code for tensor factories that name no device."""

from __future__ import annotations

import ast
from pathlib import Path

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
