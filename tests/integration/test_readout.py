"""Readout against transformers' output_hidden_states (the oracle), and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from salience_client.pb import salience_pb2 as pb
from salience_server.engine.readout import load_readout
from tests.helpers import U32_MAX, generate, open_session, random_tokens, server_start_failure
from tests.tiny_models import reference_model

CONCEPTS = ["alpha", "beta", "gamma"]
LAYERS = [0, 1]  # the tiny models have two layers: 1 is the last (before the final norm)
HIDDEN = 64


def write_readout(path: Path, layers=LAYERS, concepts=CONCEPTS, hidden=HIDDEN, seed=0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    num_concepts = len(concepts) if concepts is not None else 3
    tensors = {
        f"layers.{i}": torch.randn(num_concepts, hidden, generator=generator) for i in layers
    }
    metadata = {"concepts": json.dumps(concepts)} if concepts is not None else None
    save_file(tensors, str(path), metadata=metadata)
    return path


def oracle_readout(model_dir: Path, readout_path: Path, token_ids: list[int]) -> torch.Tensor:
    """[L, n_layers, n_concepts]: row p is read at forward position p - 1."""
    model = reference_model(model_dir)
    captured = {}
    hooks = [
        model.model.layers[i].register_forward_hook(
            lambda m, i_, o, i=i: captured.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0])
        )
        for i in LAYERS
    ]
    with torch.no_grad():
        output = model(torch.tensor([token_ids]), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    # Layer 0 two independent ways: the hook and output_hidden_states[1].
    assert torch.allclose(captured[0], output.hidden_states[1][0], atol=1e-6)
    readout = load_readout(readout_path, 2, HIDDEN)
    states = torch.stack([captured[i] for i in LAYERS])  # [n_layers, L, H]
    return torch.einsum("lph,lch->plc", states, readout.vectors)


@pytest.fixture(scope="module")
def readout_server(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import start_server

    path = write_readout(tmp_path_factory.mktemp("readout") / "readout.safetensors")
    server = start_server(
        str(tiny_llama_dir), block_size=4, kv_cache_bytes=4 << 20, readout_path=str(path)
    )
    server.extra["readout_path"] = path
    yield server
    server.stop()


def test_prefill_and_decoded_readout_equal_the_hidden_state_projection(
    tiny_llama_dir, readout_server
) -> None:
    stub = readout_server.stub
    prompt = random_tokens(30, seed=4)
    session_id = open_session(stub)
    tokens, _ = generate(
        stub, session_id, append_tokens=prompt, max_tokens=10, readout_ranges=[(0, U32_MAX)]
    )
    sequence = prompt + [t.id for t in tokens if not t.is_prefill]
    want = oracle_readout(tiny_llama_dir, readout_server.extra["readout_path"], sequence)
    assert [t.position for t in tokens] == list(range(len(sequence)))
    assert list(tokens[0].readout) == []  # position 0 has no predicting state
    for token in tokens[1:]:
        got = torch.tensor(list(token.readout)).view(len(LAYERS), len(CONCEPTS))
        assert (got - want[token.position - 1]).abs().max().item() < 1e-4


def test_a_prompt_read_out_only_computes_no_logits(
    tiny_llama_dir, readout_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits are computed for the positions scored and the one decoded from, never for a
    whole prompt (SPEC): a prompt in readout_ranges alone computed [T, V] logits and
    its events carried logprobs. Its events carry its readout and no logprob; the
    decoded tokens (and a position also scored) keep theirs."""
    engine = readout_server.engine
    execute, logits_rows = engine.runner.execute, []

    def counted_execute(batch, *args, **kwargs):
        logits_rows.append(len(batch.logits_rows))
        return execute(batch, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", counted_execute)
    stub, prompt = readout_server.stub, random_tokens(30, seed=5)
    session_id = open_session(stub)
    tokens, _ = generate(
        stub,
        session_id,
        append_tokens=prompt,
        max_tokens=3,
        readout_ranges=[(0, U32_MAX)],
        logprobs_ranges=[(7, 8)],
    )
    assert sum(logits_rows) == 1 + 3  # position 7's, and one a decode step
    sequence = prompt + [t.id for t in tokens if not t.is_prefill]
    want = oracle_readout(tiny_llama_dir, readout_server.extra["readout_path"], sequence)
    assert [t.position for t in tokens] == list(range(len(sequence)))
    for token in tokens[1:]:
        got = torch.tensor(list(token.readout)).view(len(LAYERS), len(CONCEPTS))
        assert (got - want[token.position - 1]).abs().max().item() < 1e-4
        scored = not token.is_prefill or token.position == 7
        assert (token.sampled_logprob != 0.0) == scored, token.position


def test_readout_in_a_batch_with_requests_that_ask_for_none(tiny_llama_dir, readout_server) -> None:
    import threading

    stub = readout_server.stub
    prompt = list(range(40, 60))
    want = oracle_readout(tiny_llama_dir, readout_server.extra["readout_path"], prompt)
    results = {}

    def run(name: str, **kwargs) -> None:
        session_id = open_session(stub)
        results[name] = generate(stub, session_id, append_tokens=prompt, max_tokens=8, **kwargs)[0]

    threads = [
        threading.Thread(target=run, args=("plain",), kwargs={"logprobs_ranges": [(0, U32_MAX)]}),
        threading.Thread(
            target=run,
            args=("readout",),
            kwargs={"logprobs_ranges": [(0, U32_MAX)], "readout_ranges": [(5, 12)]},
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    plain, with_readout = results["plain"], results["readout"]
    # Asking for readout changes neither the tokens nor the logprobs.
    assert [(t.id, t.position) for t in plain] == [(t.id, t.position) for t in with_readout]
    assert (
        max(
            abs(a.sampled_logprob - b.sampled_logprob)
            for a, b in zip(plain, with_readout, strict=True)
        )
        < 1e-5
    )
    assert all(not t.readout for t in plain)
    for token in with_readout:
        if 5 <= token.position < 12:
            got = torch.tensor(list(token.readout)).view(len(LAYERS), len(CONCEPTS))
            assert (got - want[token.position - 1]).abs().max().item() < 1e-4
        else:
            assert not token.readout


def test_manifest_in_model_info(readout_server) -> None:
    info = readout_server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.supports_readout
    assert list(info.readout_manifest.concepts) == CONCEPTS
    assert list(info.readout_manifest.layers) == LAYERS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden=32), "hidden size 64"),
        (dict(layers=[0, 5]), "layer 5 is past the model's 2 layers"),
        (dict(concepts=None), "no 'concepts'"),
        (dict(concepts=["a", "a", "b"]), "not unique"),
    ],
)
def test_bad_readout_files_fail_at_start_naming_the_problem(
    tmp_path, tiny_llama_dir, kwargs, message
) -> None:
    path = write_readout(tmp_path / "bad.safetensors", **kwargs)
    stderr = server_start_failure(
        "--model", str(tiny_llama_dir), "--port", "0", "--readout", str(path)
    )
    assert message in stderr


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"layers.0": torch.full((3, HIDDEN), float("nan"))}, "layers.0 is not all finite"),
        (
            {"layers.1": torch.ones(3, HIDDEN).index_fill(1, torch.tensor([5]), float("inf"))},
            "finite",
        ),
        ({"layers.1": torch.ones(3, HIDDEN), "layers.01": torch.ones(3, HIDDEN)}, "two tensors"),
        # int() reads other scripts' digits: an Arabic-Indic one was layer 1.
        ({"layers.\u0661": torch.ones(3, HIDDEN)}, "not named layers.<index>"),
    ],
)
def test_readout_files_with_unusable_vectors_are_refused(tmp_path, tensors, message) -> None:
    """A NaN vector reads NaN at every token; a layer named twice kept one tensor."""
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"concepts": json.dumps(CONCEPTS)})
    with pytest.raises(ValueError, match=message):
        load_readout(path, num_layers=2, hidden_size=HIDDEN)


def test_readout_needs_a_configured_file(llama_server) -> None:
    session_id = open_session(llama_server.stub)
    with pytest.raises(grpc.RpcError) as caught:
        generate(llama_server.stub, session_id, append_tokens=[1, 2], readout_ranges=[(0, 2)])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_client_shapes_readout_with_the_manifest_names(tiny_llama_dir, readout_server) -> None:
    from salience_client import SalienceClient

    prompt = list(range(70, 85))
    want = oracle_readout(tiny_llama_dir, readout_server.extra["readout_path"], prompt)
    with SalienceClient(readout_server.target) as client, client.open_session() as session:
        events = [
            e
            for e in session.generate(prompt, max_tokens=0, readout_ranges=[(3, 6)])
            if hasattr(e, "readout")
        ]
    assert [e.position for e in events] == [3, 4, 5]
    for event in events:
        assert event.readout.layers == LAYERS and event.readout.concepts == CONCEPTS
        assert len(event.readout.values) == 2 and len(event.readout.values[0]) == 3
        assert abs(event.readout[1, "gamma"] - want[event.position - 1, 1, 2].item()) < 1e-4
        assert event.readout.as_dict()[0]["alpha"] == event.readout.values[0][0]
