"""Stacked projections against the model as transformers built it."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from salience_server.engine import fused_linears
from salience_server.engine.fused_linears import FusedPart
from tests.tiny_models import (
    build_tiny_model,
    build_tiny_vision_model,
    reference_model,
    reference_vision_model,
)


def _models(directory: Path, vision: str | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    if vision:
        build_tiny_vision_model(directory, vision)
        return reference_vision_model(directory), reference_vision_model(directory)
    return reference_model(directory), reference_model(directory)


@pytest.mark.parametrize(
    ("architecture", "vision"),
    [("llama", None), ("qwen3", None), ("qwen2-sliding", None), ("", "qwen2_5_vl")],
)
def test_stacked_projections_give_the_model_s_logits_and_hold_one_copy(
    tmp_path: Path, architecture: str, vision: str | None
) -> None:
    if not vision:
        build_tiny_model(tmp_path, architecture)
    plain, fused = _models(tmp_path, vision)
    parameter_bytes = sum(p.numel() * p.element_size() for p in fused.parameters())
    text = fused.config.get_text_config()
    count = fused_linears.fuse_projections(fused)
    # Attention and MLP of every text layer (and the Qwen2.5-VL vision blocks' MLPs).
    vision_blocks = fused.config.vision_config.depth if vision else 0
    assert count == 2 * text.num_hidden_layers + vision_blocks
    assert sum(p.numel() * p.element_size() for p in fused.parameters()) == parameter_bytes
    linears = [m for m in fused.modules() if isinstance(m, torch.nn.Linear)]
    stacked = [m for m in fused.modules() if isinstance(m, FusedPart)]
    assert len(stacked) == 5 * text.num_hidden_layers + 2 * vision_blocks
    # Each group is one Linear: three become one in attention, two in an MLP.
    plain_linears = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert len(linears) == plain_linears - 3 * text.num_hidden_layers - vision_blocks
    tokens = torch.randint(0, text.vocab_size, (2, 9))
    with torch.inference_mode():
        want = plain(tokens).logits
        got = fused(tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Every part was taken: no layer keeps its last input or outputs alive.
    assert all(part._stacked.input is None for part in stacked)


def test_each_group_s_layers_are_freed_as_it_is_stacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers a group replaces are gone before the next group is stacked: fusing
    takes one group's weights more at a time, not the model's q/k/v/gate/up again."""
    build_tiny_model(tmp_path, "llama")
    model = reference_model(tmp_path)
    replaced: list[weakref.ref] = []
    alive_at_each_stack: list[int] = []
    stack = fused_linears._stack

    def spy(layers: list[torch.nn.Linear]) -> torch.nn.Linear:
        gc.collect()
        alive_at_each_stack.append(sum(ref() is not None for ref in replaced))
        replaced.extend(weakref.ref(layer) for layer in layers)
        return stack(layers)

    monkeypatch.setattr(fused_linears, "_stack", spy)
    assert fused_linears.fuse_projections(model) == 2 * model.config.num_hidden_layers
    # At each stacking, at most the group just stacked (held by the loop) is alive.
    assert max(alive_at_each_stack) <= 3, alive_at_each_stack


def test_a_part_called_alone_computes_its_own_projection(tmp_path: Path) -> None:
    build_tiny_model(tmp_path, "qwen2-sliding")  # q, k and v have biases
    plain, fused = reference_model(tmp_path), reference_model(tmp_path)
    fused_linears.fuse_projections(fused)
    attention, reference = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    first = torch.randn(3, attention.k_proj.in_features)
    second = first.clone()  # the same values in another tensor: computed again
    calls = [("v_proj", first), ("q_proj", second), ("v_proj", first), ("v_proj", first)]
    with torch.inference_mode():
        # Out of order, another input between, one part twice: each gets its product.
        for name, inputs in calls:
            want = getattr(reference, name)(inputs)
            torch.testing.assert_close(getattr(attention, name)(inputs), want, rtol=0, atol=1e-6)


def test_projections_that_cannot_stack_stay_as_they_are() -> None:
    class Attention(torch.nn.Module):
        def __init__(self, key_width: int) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)
            self.k_proj = torch.nn.Linear(key_width, 8)
            self.v_proj = torch.nn.Linear(8, 8)

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = torch.nn.Linear(8, 8)
            self.up_proj = torch.nn.Linear(8, 8)
            self.embedding = torch.nn.Embedding(8, 8)
            self.embedding.weight = self.up_proj.weight

    model = torch.nn.ModuleList([Attention(key_width=4), Tied(), Attention(key_width=8)])
    assert fused_linears.fuse_projections(model) == 1  # the last one only
    assert isinstance(model[0].q_proj, torch.nn.Linear)
    assert isinstance(model[1].up_proj, torch.nn.Linear)
    assert isinstance(model[2].k_proj, FusedPart)
