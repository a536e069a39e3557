"""Speculative decoding from the session's history (``--speculative ngram``) is exact:
every stream equals the same call without speculation, token for token, with the same
logprobs, top-k and readout (1e-4), through stops, limits, forks, rewinds and memory
pressure. The tiny model repeats itself under greedy decoding, so drafts are accepted."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from salience_client import SalienceClient
from tests.helpers import U32_MAX, generate, open_session, random_tokens
from tests.integration.test_readout import write_readout

TOLERANCE = 1e-4
BLOCK_SIZE = 4
TOKEN_BYTES = 512


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    """(plain, speculating) servers of the same model with the same readout."""
    from tests.conftest import start_server

    readout = write_readout(tmp_path_factory.mktemp("spec") / "readout.safetensors")
    options = dict(block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, readout_path=str(readout))
    plain = start_server(str(tiny_llama_dir), **options)
    speculating = start_server(
        str(tiny_llama_dir),
        speculative="ngram",
        num_speculative_tokens=4,
        speculative_cost=(0.0, 0.0),  # always draft the most: exactness is what is tested
        **options,
    )
    yield plain, speculating
    plain.stop()
    speculating.stop()


def _same(got, want) -> None:
    assert [(e.position, e.id, e.is_prefill) for e in got] == [
        (e.position, e.id, e.is_prefill) for e in want
    ]
    for a, b in zip(got, want, strict=True):
        assert abs(a.sampled_logprob - b.sampled_logprob) < TOLERANCE
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
        assert all(
            abs(x.logprob - y.logprob) < TOLERANCE
            for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True)
        )
        assert len(a.readout) == len(b.readout)
        assert all(abs(x - y) < TOLERANCE for x, y in zip(a.readout, b.readout, strict=True))


def _both(servers, prompt: list[int], **options):
    results = []
    for server in servers:
        results.append(
            generate(server.stub, open_session(server.stub), append_tokens=prompt, **options)
        )
    (want, want_done), (got, got_done) = results
    return want, want_done, got, got_done


# A prompt the tiny model continues by repeating itself: drafts are found and accepted.
PROMPT = random_tokens(6, seed=3) * 3


def test_greedy_output_logprobs_and_readout_equal_decoding_without_speculation(servers) -> None:
    want, want_done, got, got_done = _both(
        servers,
        PROMPT,
        max_tokens=60,
        ignore_eos=True,
        logprobs_ranges=[(0, U32_MAX)],
        logprob_top_k=3,
        readout_ranges=[(len(PROMPT), U32_MAX)],
    )
    _same(got, want)
    assert got_done.accepted_tokens > 10 and got_done.drafted_tokens >= got_done.accepted_tokens
    assert want_done.drafted_tokens == 0
    assert got_done.total_tokens == want_done.total_tokens
    # The Python client's Done carries the counts too (it dropped them).
    with SalienceClient(servers[1].target) as client, client.open_session() as session:
        done = list(session.generate(PROMPT, max_tokens=60, ignore_eos=True))[-1]
    assert (done.drafted_tokens, done.accepted_tokens) == (
        got_done.drafted_tokens,
        got_done.accepted_tokens,
    )


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_ends_inside_an_accepted_run(servers, max_tokens) -> None:
    want, want_done, got, got_done = _both(servers, PROMPT, max_tokens=max_tokens, ignore_eos=True)
    _same(got, want)
    assert got_done.completion_tokens == max_tokens


def test_min_tokens_holds_stop_tokens_back_in_a_verification_step(servers) -> None:
    """The stop token the plain call holds back as token ``min_tokens``: a step verifying
    drafts from ``min_tokens - 1`` decoded drew that token unbanned and ended the call
    one token early (here with min_tokens 2 and 5)."""
    free, _, _, _ = _both(servers, PROMPT, max_tokens=30, ignore_eos=True)
    num_drafted = 0
    for min_tokens in (2, 3, 5, 8, 13):
        want, want_done, got, got_done = _both(
            servers,
            PROMPT,
            max_tokens=30,
            ignore_eos=True,
            stop_token_ids=[free[min_tokens - 1].id],
            min_tokens=min_tokens,
        )
        _same(got, want)
        assert got_done.finish_reason == want_done.finish_reason
        num_drafted += got_done.drafted_tokens
    assert num_drafted > 0


def test_a_seeded_sampled_call_draws_what_it_draws_without_speculation(servers) -> None:
    """Same seed, same tokens, with drafts verified or not, and whether the prompt came
    with the decoding call or before it (the drafts, which depend on that, spent the
    request's random numbers: the tokens changed with them)."""
    options = dict(max_tokens=40, ignore_eos=True, temperature=0.05, logprobs_ranges=[(0, 0)])
    num_drafted = 0
    for seed in range(4):
        want, _, got, got_done = _both(servers, PROMPT, seed=seed, **options)
        _same(got, want)
        num_drafted += got_done.accepted_tokens
        stub = servers[1].stub
        split = open_session(stub)
        generate(stub, split, append_tokens=PROMPT, max_tokens=0)
        later, _ = generate(stub, split, offset=len(PROMPT), seed=seed, **options)
        _same(later, want)
    assert num_drafted > 0


def test_stop_tokens_and_stop_strings_end_inside_an_accepted_run(servers) -> None:
    free, _, _, _ = _both(servers, PROMPT, max_tokens=30, ignore_eos=True)
    stop = free[9].id  # a token decoded well into the run
    want, want_done, got, got_done = _both(
        servers, PROMPT, max_tokens=30, ignore_eos=True, stop_token_ids=[stop]
    )
    _same(got, want)
    assert got_done.finish_reason == want_done.finish_reason
    want, want_done, got, got_done = _both(
        servers,
        PROMPT,
        max_tokens=30,
        ignore_eos=True,
        return_text=True,
        stop_strings=[bytes([free[12].id]).decode("latin-1")],
    )
    assert [e.id for e in got] == [e.id for e in want] and [e.text for e in got] == [
        e.text for e in want
    ]
    assert got_done.finish_reason == want_done.finish_reason


def test_the_context_limit_ends_inside_an_accepted_run(servers) -> None:
    results = []
    for server in servers:
        session_id = open_session(server.stub, max_context=len(PROMPT) + 9)
        results.append(
            generate(server.stub, session_id, append_tokens=PROMPT, max_tokens=40, ignore_eos=True)
        )
    (want, want_done), (got, got_done) = results
    _same(got, want)
    assert got_done.finish_reason == want_done.finish_reason == 4  # CONTEXT


def test_turns_forks_and_rewinds_keep_the_index_right(servers) -> None:
    """The same sequence of calls (turns, a rewind, a fork and its own turn) on both
    servers gives the same streams."""
    streams: list[list] = [[], []]
    for index, server in enumerate(servers):
        stub = server.stub
        session_id = open_session(stub)
        _, done = generate(stub, session_id, append_tokens=PROMPT, max_tokens=20, ignore_eos=True)
        length = done.total_tokens
        tokens, done = generate(
            stub, session_id, append_tokens=PROMPT[:5], offset=length, max_tokens=15
        )
        streams[index].append(tokens)
        rewound, _ = generate(
            stub,
            session_id,
            append_tokens=[9, 9],
            offset=length - 7,
            truncating=True,
            max_tokens=15,
            ignore_eos=True,
        )
        streams[index].append(rewound)
        from salience_client.pb import salience_pb2 as pb

        child = stub.ForkSession(pb.ForkSessionRequest(session_id=session_id)).session_id
        child_length = stub.GetSession(pb.GetSessionRequest(session_id=child)).session.length
        forked, _ = generate(
            stub,
            child,
            append_tokens=PROMPT[:3],
            offset=child_length,
            max_tokens=15,
            ignore_eos=True,
        )
        streams[index].append(forked)
    for got, want in zip(streams[1], streams[0], strict=True):
        _same(got, want)


def test_speculation_under_memory_pressure_and_preemption(tiny_llama_dir, server_factory) -> None:
    """Two streams outgrow a small pool: the later is preempted and recomputed while
    both speculate; both equal their runs on a roomy server without speculation."""
    tight = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=24 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=0,
        speculative="ngram",
        speculative_cost=(0.0, 0.0),
        max_batch_tokens=16,
    )
    roomy = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    prompts = [PROMPT, random_tokens(5, seed=8) * 4]
    want = [
        generate(
            roomy.stub,
            open_session(roomy.stub),
            append_tokens=p,
            max_tokens=40,
            ignore_eos=True,
            logprobs_ranges=[(0, U32_MAX)],
        )[0]
        for p in prompts
    ]
    got: list = [None, None]

    def run(index: int) -> None:
        got[index] = generate(
            tight.stub,
            open_session(tight.stub),
            append_tokens=prompts[index],
            max_tokens=40,
            ignore_eos=True,
            logprobs_ranges=[(0, U32_MAX)],
        )[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.metrics.accepted_tokens._value.get() > 0


def test_greedy_speculation_is_exact_where_one_row_products_take_plain_weights(
    tiny_llama_dir, server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one-row products multiply plain weights (float32 on a CPU whose MKL kernels
    win them: ``cpu_matmul.narrow_products_below``) and a verification step's rows the
    prepacked ones, greedy speculation still equals decoding without it."""
    import torch

    from salience_server.engine import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "narrow_products_below", lambda *args: 2)
    options = dict(block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20, dtype="float32", device="cpu")
    plain = server_factory(tiny_llama_dir, **options)
    speculating = server_factory(
        tiny_llama_dir, speculative="ngram", speculative_cost=(0.0, 0.0), **options
    )
    if cpu_matmul.prepacks(torch.device("cpu"), torch.float32):  # else: F.linear throughout
        layer = speculating.engine.runner.model.model.layers[0].self_attn.o_proj
        assert layer.weight.is_mkldnn and layer.forward.__name__ == "forward"  # dispatching
    want, _, got, got_done = _both(
        (plain, speculating),
        PROMPT,
        max_tokens=60,
        ignore_eos=True,
        logprobs_ranges=[(0, U32_MAX)],
        logprob_top_k=3,
    )
    _same(got, want)
    assert got_done.accepted_tokens > 10


def test_a_call_cancelled_in_a_verification_step_frees_its_drafts_blocks(servers) -> None:
    """A cancel landing while a step verifies drafts: the blocks taken for the drafts'
    KV stayed with the session (released only by its next verification)."""
    from salience_client.pb import salience_pb2 as pb

    server = servers[1]
    engine = server.engine
    sample = engine.outcomes.sample
    session_id = open_session(server.stub)
    stream = server.stub.Generate(
        pb.GenerateRequest(
            session_id=session_id, append_tokens=PROMPT, max_tokens=60, ignore_eos=True
        )
    )

    cancelled = []

    def cancel_while_verifying(chunks, *args):
        for chunk in chunks:
            session = chunk.request.session
            if len(session.block_table) > -(-session.length // BLOCK_SIZE):  # drafts' own
                stream.cancel()  # the client goes away mid-step
                engine.cancel(chunk.request)  # and the server sees it before the commit
                cancelled.append(chunk.draft_token_ids)
        return sample(chunks, *args)

    engine.outcomes.sample = cancel_while_verifying
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
    finally:
        engine.outcomes.sample = sample
    deadline = time.monotonic() + 30
    while (info := _info(server, session_id)).busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not info.busy
    assert cancelled and cancelled[0]  # in a step verifying drafts
    assert info.num_blocks == -(-info.length // BLOCK_SIZE)


def _info(server, session_id: str):
    from salience_client.pb import salience_pb2 as pb

    return server.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session


def test_greedy_near_ties_go_as_without_speculation(tiny_llama_dir, server_factory, tmp_path):
    """Two tokens whose float32 logits differ by less than log_softmax keeps: a plain
    greedy step takes the first (its logprobs tie); a verification took the argmax of
    the logits, the second, and the greedy outputs differed from the third token on."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "near-ties")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        row = torch.randn(model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))
        model.lm_head.weight.zero_()  # every other logit 0: the pair wins when positive
        model.lm_head.weight[5] = row * 1e-3
        model.lm_head.weight[7] = row * 1e-3 * (1 + 1e-6)
    model.save_pretrained(model_dir)
    options = dict(block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    plain = server_factory(model_dir, **options)
    speculating = server_factory(
        model_dir, speculative="ngram", speculative_cost=(0.0, 0.0), **options
    )
    want, _, got, got_done = _both(
        (plain, speculating), [5, 0] * 3 + [5], max_tokens=40, ignore_eos=True
    )
    assert 7 not in [e.id for e in want]
    _same(got, want)
    assert got_done.accepted_tokens > 0
