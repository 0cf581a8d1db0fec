"""Point 5 and 8: paged KV cache, continuous batching (token budget, chunked prefill, max seqs),
preemption by recompute, per-request errors, seeded random weights, sampling and streaming."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import executors
from executors import Request, Sampling
from executors.scheduler import Chunk, Scheduler, Seq, build_microbatch
from executors.weights import SafetensorsSource, random_tensor
from tests.tiny.helpers import IMAGE_TOKEN, check_against_oracle, config, hf_model, make_plan, random_image, save_checkpoint

GREEDY = Sampling(stop_on_eos=False)


# ---------------------------------------------------------------- scheduler (pure Python)


def _seq(rid: int, n: int, new: int = 4) -> Seq:
    return Seq(req=rid, tokens=list(range(1, n + 1)), prompt_len=n, max_new=new)


def test_token_budget_chunked_prefill_and_max_seqs() -> None:
    s = Scheduler(num_blocks=100, block_size=4, max_batch_tokens=10, max_seqs=2)
    for i, n in enumerate([23, 3, 5]):
        s.add(_seq(i, n))
    chunks, _ = s.schedule()
    assert [(c.seq.req, c.n) for c in chunks] == [(0, 10)]  # budget caps the first prefill chunk
    for c in chunks:
        c.seq.computed += c.n
    chunks, _ = s.schedule()
    assert [(c.seq.req, c.n) for c in chunks] == [(0, 10)]
    for c in chunks:
        c.seq.computed += c.n
    chunks, _ = s.schedule()  # 3 left of seq 0, then seq 1 (3 tokens); max_seqs=2 keeps seq 2 waiting
    assert [(c.seq.req, c.n) for c in chunks] == [(0, 3), (1, 3)]
    assert len(s.running) == 2 and len(s.waiting) == 1
    assert sum(len(q.blocks) for q in s.running) == 6 + 1  # ceil(23/4) + ceil(3/4)


def test_preemption_frees_blocks_and_requeues_first() -> None:
    s = Scheduler(num_blocks=4, block_size=4, max_batch_tokens=64, max_seqs=4)
    a, b = _seq(0, 8), _seq(1, 7)
    s.add(a)
    s.add(b)
    chunks, _ = s.schedule()
    assert [c.n for c in chunks] == [8, 7] and not s.pool.free
    for c in chunks:
        c.seq.computed += c.n
        c.seq.tokens.append(99)  # a sampled token: seq a now needs a third block
    chunks, dropped = s.schedule()
    assert dropped == [1] and s.preemptions == 1
    assert s.waiting[0] is b and b.computed == 0 and b.blocks == []
    assert [(c.seq.req, c.n) for c in chunks] == [(0, 1)]


def test_microbatch_slots_follow_block_table() -> None:
    q = _seq(0, 6)
    q.blocks = [5, 2]
    q.computed = 4
    mb = build_microbatch([Chunk(q, 2)], "tp", 4, None)
    assert mb.slots.tolist() == [2 * 4 + 0, 2 * 4 + 1]  # positions 4, 5 live in block 2
    assert mb.key_slots.numel() == 0  # the key lists are filled where an attention path needs them
    assert mb.with_keys(4).key_slots.tolist() == [20, 21, 22, 23, 8, 9]
    assert mb.key_seq.tolist() == [0] * 6 and mb.key_pos.tolist() == list(range(6))
    assert mb.sample_idx.tolist() == [1] and mb.tok_idx.tolist() == [4, 5]


def test_decode_microbatch_attends_over_each_sequence_own_keys() -> None:
    """Decodes (one query per sequence) get ``[S, L_max]`` key slots padded with the scratch slot;
    a micro-batch with a prefill chunk keeps the packed mask."""
    from executors.attention import decode_keys

    a, b = _seq(0, 6), _seq(1, 3)
    a.blocks, b.blocks = [5, 2], [7]
    a.computed, b.computed = 5, 2  # each has one token left: its last position
    keys, valid = decode_keys(build_microbatch([Chunk(a, 1), Chunk(b, 1)], "tp", 4, None), scratch=99, block=4)
    assert keys.tolist() == [[20, 21, 22, 23, 8, 9], [28, 29, 30, 99, 99, 99]]
    assert valid.sum(1).tolist() == [6, 3]
    a.computed = 3
    assert decode_keys(build_microbatch([Chunk(a, 3), Chunk(b, 1)], "tp", 4, None), scratch=99, block=4) is None


def test_safetensors_source_reads_only_slices(tmp_path: Path) -> None:
    save_checkpoint("llama", tmp_path, seed=3)
    src = SafetensorsSource(tmp_path)
    full = src.rows("model.layers.1.self_attn.q_proj.weight")
    part = src.rows("model.layers.1.self_attn.q_proj.weight", [(16, 32), (48, 64)])
    assert torch.equal(part, torch.cat([full[16:32], full[48:64]]))
    cols = src.rows("model.layers.1.self_attn.o_proj.weight", [(0, 16)], dim=1)
    assert cols.shape == (64, 16)


# ---------------------------------------------------------------- engine, single rank (in process)


def test_seeded_random_weights_match_hf() -> None:
    """weights=None: every rank generates the same seeded tensors the oracle is given."""
    plan = make_plan("qwen2")
    oracle = hf_model("qwen2")
    with torch.no_grad():
        for n, p in oracle.named_parameters():
            p.copy_(random_tensor(n, tuple(p.shape), 11))  # tied lm_head is not listed separately
    with executors.load(plan, seed=11, keep_logits=True) as eng:
        res = eng.generate([Request(tokens=[4, 5, 6, 7])], max_new_tokens=12, sampling=GREEDY)[0]
    assert check_against_oracle(oracle, [4, 5, 6, 7], res) < 1e-4


def test_sampling_is_seeded_and_stream_yields_in_order(tmp_path: Path) -> None:
    save_checkpoint("llama", tmp_path)
    plan = make_plan("llama")
    reqs = [Request(tokens=[3, 4, 5]), Request(tokens=[9, 10])]
    hot = Sampling(temperature=1.0, top_k=20, seed=5, stop_on_eos=False)
    with executors.load(plan, weights=tmp_path) as eng:
        a = eng.generate(reqs, max_new_tokens=10, sampling=hot)
        b = eng.generate(reqs, max_new_tokens=10, sampling=hot)
        greedy = eng.generate(reqs, max_new_tokens=10, sampling=GREEDY)
        seen: dict[int, list[int]] = {0: [], 1: []}
        for i, tok, _res in eng.stream(reqs, max_new_tokens=10, sampling=GREEDY):
            seen[i].append(tok)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert a[0].tokens != greedy[0].tokens or a[1].tokens != greedy[1].tokens
    assert seen == {0: greedy[0].tokens, 1: greedy[1].tokens}


# ---------------------------------------------------------------- one multi-rank launch: faults + KV pressure


def test_bad_requests_and_kv_exhaustion_shift_sp2(tmp_path: Path) -> None:
    """shift(sp2) on Qwen2-VL with a 12-block cache (48 token slots) and 5 good requests needing
    ~110 slots: requests wait or are preempted and recomputed; every accepted one matches HF. Bad
    requests (past the context, empty, unreadable image) get their own error."""
    oracle = save_checkpoint("qwen2_vl", tmp_path / "w", seed=5)
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not a png")
    plan = make_plan("qwen2_vl", sp=2, shift=True, threshold=8, max_batch_tokens=32)
    img = random_image((4, 4), 9)
    good = [Request(tokens=[5, 6, 7, 8, 9, 10]), Request(tokens=list(range(20, 31))),
            Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8], images=[img]), Request(tokens=[40, 41, 42]),
            Request(tokens=list(range(50, 60)))]
    bad = [Request(tokens=[1] * 250), Request(tokens=[]), Request(tokens=[3, IMAGE_TOKEN], images=[bad_image])]
    reqs = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], good[4]]
    with executors.load(plan, weights=tmp_path / "w", keep_logits=True, kv_blocks=12) as eng:
        results = eng.generate(reqs, max_new_tokens=16, sampling=GREEDY)
        preempted = eng.schedulers[0].preemptions
        other = random_image((4, 6), 10)  # a second call: new images, no state left from the first
        again = Request(tokens=[118, IMAGE_TOKEN, 119, 9], images=[other])
        second = eng.generate([again], max_new_tokens=8, sampling=GREEDY)[0]
    assert check_against_oracle(oracle, again.tokens, second, [other]) < 1e-4
    assert "exceeds the context this engine serves (256 tokens" in results[1].error
    assert "empty request" in results[3].error
    assert "cannot read image" in results[5].error and "broken.png" in results[5].error
    assert preempted > 0
    for req, res in zip(reqs, results):
        if req in good:
            assert res.error is None and len(res.tokens) == 16
            assert check_against_oracle(oracle, req.tokens, res, [img] if req.images else None) < 1e-4


# ---------------------------------------------------------------- scheduler invariants (property test)

@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=10),
       blocks=st.integers(13, 40), budget=st.integers(1, 48), max_seqs=st.integers(1, 6))
@example(lens=[(38, 4), (23, 12)], blocks=13, budget=21, max_seqs=2)  # two sequences once preempted each other forever
def test_scheduler_completes_everything_within_limits(lens: list, blocks: int, budget: int, max_seqs: int) -> None:
    """Any mix of requests that each fit the cache completes; every step respects the token budget,
    max_seqs and the block pool; a sequence's computed tokens never pass its length."""
    bs = 4
    s = Scheduler(num_blocks=blocks, block_size=bs, max_batch_tokens=budget, max_seqs=max_seqs)
    seqs = [_seq(i, p, n) for i, (p, n) in enumerate(lens) if -(-(p + n) // bs) <= blocks]
    for q in seqs:
        s.add(q)
    steps = 0
    while s.has_work():
        steps += 1
        assert steps < 10_000, "scheduler stalled"
        chunks, _ = s.schedule()
        assert chunks, "no progress"
        assert sum(c.n for c in chunks) <= budget and len(s.running) <= max_seqs
        assert sum(len(q.blocks) for q in s.running) + len(s.pool.free) == blocks
        for c in chunks:
            c.seq.computed += c.n
            assert c.seq.computed <= len(c.seq.tokens)
            assert len(c.seq.blocks) * bs >= c.seq.computed
            if c.seq.computed == len(c.seq.tokens):
                c.seq.tokens.append(7)
                if c.seq.generated >= c.seq.max_new:
                    s.finish(c.seq)
    assert all(q.generated == q.max_new for q in seqs)
    assert len(s.pool.free) == blocks


def test_decode_microbatch_fast_path_equals_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes of generated tokens are packed from plain lists (no per-sequence tensors); every field
    equals the general packing's, key lists included once filled, for 1-D and M-RoPE positions."""
    from executors.scheduler import _decode_microbatch, _packed_microbatch

    seqs = []
    for i, (prompt, total) in enumerate([(5, 9), (3, 4), (7, 20)]):
        s = Seq(req=i, tokens=list(range(10, 10 + total)), prompt_len=prompt, max_new=30, computed=total - 1)
        s.blocks = [3 * i + 40 - j for j in range(6)]
        if i == 2:
            s.mrope, s.mrope_delta = torch.arange(7).repeat(3, 1), -2
        seqs.append(s)
    for group in (seqs[:2], seqs):
        if group is seqs:  # M-RoPE for all: a model's sequences are all 1-D or all M-RoPE
            for s in group:
                s.mrope = s.mrope if s.mrope is not None else torch.arange(s.prompt_len).repeat(3, 1)
        chunks = [Chunk(s, 1) for s in group]
        fast, ref = _decode_microbatch(chunks, "tp", 4), _packed_microbatch(chunks, "tp", 4)
        with monkeypatch.context() as m:  # the fast path is taken
            m.setattr("executors.scheduler._packed_microbatch", lambda *a: pytest.fail("packed path taken"))
            build_microbatch(chunks, "tp", 4, None)
        fast.with_keys(4), ref.with_keys(4)
        for f in ("tokens", "pos", "seq", "tok_idx", "slots", "key_slots", "key_seq", "key_pos", "sample_idx"):
            assert torch.equal(getattr(fast, f), getattr(ref, f)), f
        assert (fast.sample_req, fast.blocks, fast.ctx, fast.decode) == (ref.sample_req, ref.blocks, ref.ctx, ref.decode)


def test_gpu_sampling_draws_from_softmax_and_ignores_the_batch() -> None:
    """Gumbel-max over hashed uniforms: token frequencies over many (request, position) rows match
    softmax(logits / T) restricted to the top k, and a row's token is the same alone or in a batch."""
    from executors.sampling import row_key, sample, uniforms

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    T, k, n = 0.8, 4, 20000
    keys = [row_key(7, r, p) for r in range(200) for p in range(100)]
    toks = sample(logits.expand(n, -1), T, k, keys)
    freq = torch.bincount(toks, minlength=6).double() / n
    want = torch.cat([(logits[:k] / T).softmax(-1), torch.zeros(2)]).double()
    assert (freq - want).abs().max() < 0.015, (freq, want)
    alone = [int(sample(logits[None], T, k, [key])[0]) for key in keys[:50]]
    assert alone == toks[:50].tolist()
    u = uniforms(torch.tensor(keys[:100]), 1000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert len(set(keys)) == len(keys) and row_key(7, 0, 0) != row_key(8, 0, 0)
    from executors.sampling import _mix, _signed, splitmix64  # the int and the tensor finaliser agree

    zs = [0, 1, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    assert splitmix64(torch.tensor([_signed(z) for z in zs])).tolist() == [_signed(_mix(z)) for z in zs]


def test_requests_arrive_over_time(tmp_path: Path) -> None:
    """With ``arrivals`` a request is admitted only at its time: its first token comes after it, an
    idle engine waits for the next one, and the tokens are those of all-at-once greedy decoding."""
    from executors.bench import replay

    save_checkpoint("llama", tmp_path)
    reqs = [Request(tokens=[3, 4, 5]), Request(tokens=[9, 10]), Request(tokens=list(range(20, 40)))]
    arrivals, n = [0.0, 0.25, 0.6], [6, 3, 5]
    with executors.load(make_plan("llama"), weights=tmp_path) as eng:
        want = [r.tokens for r in eng.generate([Request(tokens=r.tokens, max_new_tokens=k) for r, k in zip(reqs, n)],
                                               sampling=GREEDY)]
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for i, tok, _res in eng.stream([Request(tokens=r.tokens, max_new_tokens=k) for r, k in zip(reqs, n)],
                                       sampling=GREEDY, arrivals=arrivals):
            got[i].append(tok)
        log = replay(eng, reqs, arrivals, n)
    assert [got[i] for i in range(3)] == want
    for (arrival, first, finish, out, prompt), k, r in zip(log["requests"], n, reqs):
        assert arrival <= first <= finish and out == k and prompt == len(r.tokens)
    assert log["requests"][2][1] >= 0.6 and log["t_end"] >= 0.6 and log["steps"] >= max(n)
    assert log["micro_batches_tp"] >= log["steps"] and log["preemptions"] == 0


def test_arrivals_count_from_when_every_request_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing requests (validation, pixels, M-RoPE positions) happens before the stream's clock
    starts: arrivals count from ``Engine.clock0``, set after the last request is built, so slow
    preparation does not make later requests arrive at once."""
    from executors import engine as engine_mod
    from executors.bench import replay

    built: list[float] = []
    make_seq = engine_mod.make_seq

    def slow_make_seq(*args, **kwargs):
        time.sleep(0.02)
        s = make_seq(*args, **kwargs)
        built.append(time.perf_counter())
        return s

    monkeypatch.setattr(engine_mod, "make_seq", slow_make_seq)
    save_checkpoint("llama", tmp_path)
    reqs = [Request(tokens=[3, 4, 5]), Request(tokens=[9, 10])]
    with executors.load(make_plan("llama"), weights=tmp_path) as eng:
        log = replay(eng, reqs, [0.0, 0.05], [2, 2])
        assert len(built) == 2 and eng.clock0 >= built[-1]
    assert all(arrival <= first for arrival, first, *_ in log["requests"])


@pytest.mark.parametrize("mesh", [{}, {"dp": 2}], ids=["in-process", "dp2 spawned"])
def test_warm_up_settles_the_heap_and_changes_no_token(mesh: dict, tmp_path: Path) -> None:
    """``Engine.warm_up`` ends with the heap settled (``gc.freeze``: loading and warming up are never
    scanned by the collector again) in the driver and, through an empty step, in spawned ranks
    (which then still answer); tokens are those of an engine that did not warm up."""
    import gc

    reqs = [Request(tokens=list(range(3 + i, 12 + 2 * i))) for i in range(3)]
    plan = make_plan("llama", max_batch_tokens=32, max_seqs=4, **mesh)
    gc.unfreeze()
    try:
        with executors.load(plan, kv_blocks=64) as eng:
            plain = [r.tokens for r in eng.generate(reqs, max_new_tokens=3, sampling=GREEDY)]
        assert gc.get_freeze_count() == 0
        with executors.load(plan, kv_blocks=64, warm_up=True) as eng:
            assert gc.get_freeze_count() > 0
            assert [r.tokens for r in eng.generate(reqs, max_new_tokens=3, sampling=GREEDY)] == plain
    finally:
        gc.unfreeze()


def test_an_end_of_warm_up_step_freezes_the_rank_heap() -> None:
    """A step marked ``end_warm_up`` (what ``Engine.warm_up`` sends spawned ranks) finishes the rank's
    warm-up, which collects and freezes its heap, before it runs."""
    import gc

    from executors.batch import Step

    gc.unfreeze()
    try:
        with executors.load(make_plan("llama"), kv_blocks=16) as eng:
            assert eng.local is not None and gc.get_freeze_count() == 0
            eng.local.launch(Step(1, [], end_warm_up=True))
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_warm_up_builds_the_prompt_plans_at_the_stage_attention_shapes(monkeypatch) -> None:
    """``Engine.warm_up`` ends on every rank with ``StageModel.warm_attention``: cuDNN's plans for
    whole prompts (``attention.warm_prompt_plans``) at the stage's (query heads, KV heads, head dim)
    up to the step budget, then the heap settled. On a CPU the plans themselves are skipped."""
    import gc

    import executors.stage as stage_mod
    from executors.attention import warm_prompt_plans
    from executors.config import model_args

    calls = []
    monkeypatch.setattr(stage_mod, "warm_prompt_plans", lambda *a: calls.append(a) or warm_prompt_plans(*a))
    plan = make_plan("llama", max_batch_tokens=48, max_seqs=4)
    a = model_args(config("llama"))
    gc.unfreeze()
    try:
        with executors.load(plan, kv_blocks=64, warm_up=True):
            pass
    finally:
        gc.unfreeze()
    assert [(c[0], c[3]) for c in calls] == [({(a.heads, a.kv_heads, a.head_dim)}, 48)]
    assert warm_prompt_plans(*calls[0]) == 0  # no CUDA: no plan to build


def test_max_context_refuses_longer_requests_and_bounds_the_graph_keys() -> None:
    """``load(..., max_context=N)``: a request of more than N tokens (prompt + output) fails with one
    message naming the limit while the others are served; the limit never raises the model's own
    context, and below one token it is a user error."""
    import executors
    from executors.config import limit_context, model_args
    from plans.errors import UserError

    plan = make_plan("llama", max_batch_tokens=64, max_seqs=8)
    with executors.load(plan, kv_blocks=64, max_context=40) as eng:
        assert eng.args.max_positions == 40
        ok, long = eng.generate([Request(tokens=list(range(3, 30))), Request(tokens=list(range(3, 34)))],
                                max_new_tokens=10, sampling=GREEDY)
    assert ok.error is None and len(ok.tokens) == 10
    assert "31 tokens + 10 new tokens = 41 exceeds the context this engine serves (40 tokens" in long.error
    a = model_args(config("llama"))
    assert limit_context(a, None) is a and limit_context(a, 10 ** 9).max_positions == a.max_positions
    with pytest.raises(UserError, match="max_context 0"):
        limit_context(a, 0)
