"""A leaner forward for the decoder layers of the Llama family (Llama, Qwen2, Qwen3).

transformers' layer runs a dozen modules and wrappers around each decoder layer's few
products: the attention and MLP modules, two RMSNorm modules (four in Qwen3), keyword
deprecation wrappers, the Hub-kernel wrappers around the attention module and the
rotary function (a context variable set and reset per layer, two more module calls),
and the attention interface's lookup. On a decode step these cost more than the
layer's own small operators: ~1-1.5 ms of a 15-20 ms step of the default model on this
project's 2-core CPU (both dtypes), and on a GPU, where a small model's step is bound
by the host launching it, a larger share.

``streamline`` replaces each such layer's ``forward`` (on the instance: the layer is
still called through its module, so hooks on it, such as readout's, still run) with
``forward``, which computes the same operators in the same order as transformers'
modules, so its outputs are bit for bit the same (a test compares them in float32 and
bfloat16). The projections are still called as modules (``fused_linears`` and
``cpu_matmul`` set them up), but a stacked group's product is made here, once, and
split, without its parts' five module calls per layer: another ~1 ms of a default-model
decode step on that CPU (0.94x, both dtypes). Other architectures keep transformers'
forward.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from salience_server.engine import fused_linears

LAYERS = {
    "LlamaDecoderLayer": False,
    "Qwen2DecoderLayer": True,
    "Qwen3DecoderLayer": True,
}
"""The layers streamlined, and whether their attention passes its ``sliding_window``
to the attention function (transformers' Qwen2 and Qwen3 do; Llama passes none)."""
QKV, GATE_UP = fused_linears.GROUPS


def streamline(model: torch.nn.Module) -> int:
    """Gives each decoder layer of a supported class the lean ``forward``; returns how
    many layers changed."""
    count = 0
    for module in model.modules():
        passes_window = LAYERS.get(type(module).__name__)
        if (
            passes_window is None
            or not type(module).__module__.startswith("transformers.models.")
            or not _has_the_expected_parts(module)
        ):
            continue
        attention: Any = module.self_attn
        mlp: Any = module.mlp
        window = {"sliding_window": attention.sliding_window} if passes_window else {}
        module.__dict__["_salience_attention_kwargs"] = window
        # transformers' own attention where none is registered under the config's name.
        eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
        module.__dict__["_salience_eager_attention"] = eager
        # Stacked projections (``fused_linears``) multiplied here as one, without
        # their parts' module calls.
        qkv = fused_linears.stacked_group(attention, QKV)
        module.__dict__["_salience_qkv"] = qkv
        # Queries and keys rotated as one tensor, where no per-head norm comes between.
        module.__dict__["_salience_rotates_stacked"] = qkv is not None and not hasattr(
            attention, "q_norm"
        )
        module.__dict__["_salience_gate_up"] = fused_linears.stacked_group(mlp, GATE_UP)
        # SiLU (the family's activation) as the function its module calls.
        silu = type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU")
        module.__dict__["_salience_act"] = F.silu if silu else mlp.act_fn
        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        count += 1
    return count


def forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' decoder layer, attention and MLP, inline (see the module's docstring)."""
    attention, mlp = self.self_attn, self.mlp
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attention.head_dim)
    normed = _rms_norm(hidden_states, self.input_layernorm)
    assert position_embeddings is not None
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if self._salience_rotates_stacked:
        query, key, value = _rotated_stacked_qkv(self._salience_qkv, normed, hidden_shape, cos, sin)
    else:
        query, key, value = _products(attention, QKV, self._salience_qkv, normed)
        query, key = query.view(hidden_shape), key.view(hidden_shape)
        value = value.view(hidden_shape).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3
            query, key = _rms_norm(query, attention.q_norm), _rms_norm(key, attention.k_norm)
        query, key = (
            _rotated(query.transpose(1, 2), cos, sin),
            _rotated(key.transpose(1, 2), cos, sin),
        )
    if cache is not None:  # transformers' own cache (the engine's KV is in attention)
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, self._salience_eager_attention
    )
    output, _ = attend(
        attention,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=attention.scaling,
        **self._salience_attention_kwargs,
        position_ids=position_ids,
        use_cache=use_cache,
        **kwargs,
    )
    output = attention.o_proj(output.reshape(*input_shape, -1).contiguous())
    hidden_states = hidden_states + output
    normed = _rms_norm(hidden_states, self.post_attention_layernorm)
    gate, up = _products(mlp, GATE_UP, self._salience_gate_up, normed)
    output = mlp.down_proj(self._salience_act(gate) * up)
    return hidden_states + output


def _rotated_stacked_qkv(
    stacked: tuple[torch.nn.Linear, list[int]],
    inputs: torch.Tensor,
    hidden_shape: tuple[int, ...],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked q/k/v product as [B, heads, T, D] queries, keys and values, queries
    and keys rotated together: the same elementwise operators on the same values as
    rotating each (bit for bit), in one set of them rather than two (about 8 us of a
    layer's decode on this project's CPU)."""
    linear, (query_width, key_width, value_width) = stacked
    queries_and_keys, value = linear(inputs).split([query_width + key_width, value_width], -1)
    queries_and_keys = _rotated(queries_and_keys.view(hidden_shape).transpose(1, 2), cos, sin)
    head_dim = hidden_shape[-1]
    query, key = queries_and_keys.split([query_width // head_dim, key_width // head_dim], 1)
    return query, key, value.view(hidden_shape).transpose(1, 2)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one of its two tensors."""
    return (x * cos) + (_rotate_half(x) * sin)


def _products(
    module: Any,
    names: tuple[str, ...],
    stacked: tuple[torch.nn.Linear, list[int]] | None,
    inputs: torch.Tensor,
) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """``module``'s projections ``names`` of ``inputs``: where they are stacked, the
    stacked product split, as its parts would compute it one by one; else each called."""
    if stacked is not None:
        linear, sizes = stacked
        return linear(inputs).split(sizes, dim=-1)
    return [getattr(module, name)(inputs) for name in names]


def _rms_norm(hidden_states: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' RMSNorm, operator for operator (``F.rms_norm`` rounds differently
    in 16-bit dtypes: it scales by the weight before rounding), without its two
    conversions where the input is float32 already (no-ops, but two calls each)."""
    dtype = hidden_states.dtype
    if dtype != torch.float32:
        hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    if dtype != torch.float32:
        hidden_states = hidden_states.to(dtype)
    return norm.weight * hidden_states


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _has_the_expected_parts(layer: torch.nn.Module) -> bool:
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [
        getattr(layer, "input_layernorm", None),
        getattr(layer, "post_attention_layernorm", None),
    ]
    return (
        attention is not None
        and mlp is not None
        and all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        and all(hasattr(norm, "variance_epsilon") for norm in norms)
        and not attention.training
    )
