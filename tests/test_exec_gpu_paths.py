"""The GPU-only attention paths and the decode-graph inputs, checked on CPU against the packed path.

On CUDA, prefill and mixed micro-batches run one fused SDPA per sequence, decodes a grouped
matmul, and decode steps replay CUDA graphs over padded static inputs. The arithmetic of each is
device-independent, so here each is compared with the CPU path (packed block-diagonal mask) on
the same cache and micro-batch; the GPU itself is covered by bench/engine_gpu_check.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from executors.attention import (LayerCache, _attend_decode_grouped, _attend_per_sequence, attend, decode_keys,
                                 packed_mask, sequence_spans, split_decodes)
from executors.model import AttnMeta
from executors.scheduler import Chunk, Seq, build_microbatch
from tests.tiny.helpers import run_interpreted

BLOCK = 4


def _microbatch(chunks: list[tuple[int, int, int]]) -> object:
    """``(prompt, computed, n)`` per sequence -> a MicroBatch over scattered blocks."""
    out, nxt = [], 0
    for j, (total, computed, n) in enumerate(chunks):
        s = Seq(req=j, tokens=list(range(total)), prompt_len=total, max_new=4, computed=computed)
        nb = -(-(computed + n) // BLOCK)
        s.blocks = [nxt + 2 * i for i in range(nb)]  # every other block: slots are not contiguous
        nxt += 2 * nb + 1
        out.append(Chunk(s, n))
    return build_microbatch(out, "tp", BLOCK, None).with_keys(BLOCK)  # the packed paths read the key lists


def _cache(slots: int, hkv: int, D: int, g: torch.Generator) -> LayerCache:
    c = LayerCache(slots, hkv, D, torch.float32, torch.device("cpu"))
    c.k.copy_(torch.randn(c.k.shape, generator=g))
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    return c


def _packed_reference(seed: int, chunks: list[tuple[int, int, int]], kv_map: str | None) -> tuple:
    """A micro-batch of ``chunks``, random q/k/v, the packed path's output over a random cache, and
    a fresh copy of that cache (before the packed path stored the new keys) for the path under test."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, D = 8, 2, 16
    mb = _microbatch(chunks)
    T = mb.num_tokens
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (hq, hkv, hkv))
    kv_of_q = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]) if kv_map else None
    ref_cache = _cache(200, hkv, D, g)
    cache = LayerCache(200, hkv, D, torch.float32, torch.device("cpu"))
    cache.k.copy_(ref_cache.k)
    cache.v.copy_(ref_cache.v)
    want = attend(q, k, v, ref_cache, AttnMeta(mb.slots, mb.key_slots, packed_mask(mb, T, q.device)), kv_of_q)
    return mb, q, k, v, kv_of_q, cache, want


@pytest.mark.parametrize("kv_map", [None, "replicated"])
def test_per_sequence_attention_equals_packed(kv_map: str | None) -> None:
    """First chunks, later chunks after cached keys, and single decodes in one micro-batch."""
    mb, q, k, v, kv_of_q, cache, want = _packed_reference(
        0, [(12, 0, 12), (20, 8, 5), (30, 29, 1), (9, 0, 9), (17, 16, 1)], kv_map)
    meta = AttnMeta(mb.slots, mb.key_slots, None, seqs=sequence_spans(mb))
    dst = mb.slots
    cache.k[dst], cache.v[dst] = k, v
    got = _attend_per_sequence(q, k, v, cache, meta, kv_of_q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_sequence_attention_keeps_off_cudnn(monkeypatch) -> None:
    """Every per-sequence SDPA call runs with cuDNN's backend off (``attention.SDPA_BACKENDS``: it
    builds a plan per new shape; on CUDA a whole prompt of ``PROMPT_CUDNN_MIN`` tokens or more takes
    cuDNN at a bucketed length, the next test), and the flags are as they were after the step."""
    import executors.attention as attn

    seen: list[bool] = []
    sdpa = attn.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    # a first chunk and a decode (a chunk after cached keys takes a bias whose dispatch re-enters SDPA)
    mb, q, k, v, kv_of_q, cache, _want = _packed_reference(0, [(12, 0, 12), (30, 29, 1)], None)
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    attn._attend_per_sequence(q, k, v, cache, AttnMeta(mb.slots, mb.key_slots, None, seqs=sequence_spans(mb)), kv_of_q)
    assert seen == [False] * 2 and torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_whole_prompt_padded_to_its_bucket_gives_its_own_rows() -> None:
    """``attention.padded_causal`` at ``prompt_bucket(n)`` (the length cuDNN runs a whole prompt at):
    the zero-padded keys come after every real query, so the rows kept are unpadded causal SDPA's, and
    SDPA's backend priority order is as it was (a priority set inside the per-sequence path once left
    the vision tower's attention on the flash kernel); buckets pad by at most an eighth and are their
    own buckets."""
    import executors.attention as attn

    n = attn.PROMPT_CUDNN_MIN + 77
    L = attn.prompt_bucket(n)
    assert n < L <= n * 9 / 8 and attn.prompt_bucket(n - 100) == n - 100  # below the minimum: no padding
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h in (8, 2, 2))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    order = torch._C._get_sdp_priority_order()
    with attn.sdpa_backends():  # nested as the per-sequence path nests it: SDPA's priority order stays
        torch.testing.assert_close(attn.padded_causal(q, k, v, L, attn.SDPA_BACKENDS), want, rtol=1e-5, atol=1e-5)
    assert torch._C._get_sdp_priority_order() == order
    buckets = attn.prompt_buckets(8192)
    assert buckets[0] == attn.PROMPT_CUDNN_MIN and buckets[-1] == 8192 and len(buckets) == 33
    assert all(attn.prompt_bucket(b) == b for b in buckets)


@pytest.mark.parametrize("kv_map", [None, "replicated"])
def test_mixed_step_decodes_attend_together(kv_map: str | None) -> None:
    """A mixed micro-batch as CUDA runs it: prefill chunks one by one, its decodes in one batched
    call through their block-table rows (``split_decodes``); the same outputs as the packed path."""
    mb, q, k, v, kv_of_q, cache, want = _packed_reference(
        1, [(12, 0, 12), (30, 29, 1), (20, 8, 5), (17, 16, 1), (6, 5, 1)], kv_map)
    seqs, decodes = split_decodes(mb, sequence_spans(mb), BLOCK, q.device)
    assert [n for _t0, n, _k0, _ctx in seqs] == [12, 5] and decodes["dec_rows"].tolist() == [12, 18, 19]
    got = attend(q, k, v, cache, AttnMeta(mb.slots, mb.key_slots, None, seqs=seqs, **decodes), kv_of_q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [0, 64])
def test_grouped_decode_equals_sdpa(width: int) -> None:
    """Decodes of several contexts: the block-table path (padding block masked) against the CPU
    path (batched masked SDPA over slot lists padded with the scratch slot to ``width``)."""
    g = torch.Generator().manual_seed(1)
    hq, hkv, D = 8, 2, 16
    mb = _microbatch([(30, 29, 1), (7, 6, 1), (18, 17, 1)])
    S = mb.num_tokens
    cache = _cache(200, hkv, D, g)
    keys, valid = decode_keys(mb, 200, BLOCK, width)
    assert keys.shape[1] == max(width, 30)
    meta = AttnMeta(mb.slots, mb.key_slots, None, keys, valid)
    q, k, v = (torch.randn(S, h, D, generator=g) for h in (hq, hkv, hkv))
    want = attend(q, k, v, cache, meta, None)  # CPU: batched masked SDPA
    nb = max(len(b) for b in mb.blocks) + 1  # one padding block per row (block 0, masked)
    table = torch.tensor([b + [0] * (nb - len(b)) for b in mb.blocks])
    mask = torch.arange(nb * BLOCK)[None, :] < torch.tensor(mb.ctx)[:, None]
    by_block = AttnMeta(mb.slots, mb.key_slots, None, seq_mask=mask, table=table, block_size=BLOCK)
    torch.testing.assert_close(_attend_decode_grouped(q, cache, by_block, None), want, rtol=1e-5, atol=1e-5)


def test_decode_graph_inputs_give_the_eager_logits(tmp_path) -> None:
    """A decode step through the graph's padded static inputs (batch and key buckets, scratch-slot
    padding) gives the eager step's logits; prefill first so the cache holds real keys."""
    import executors
    from executors.graphs import DecodeGraphs, bucket
    from plans.engine_shapes import keys_bucket
    from executors.scheduler import Scheduler
    from tests.tiny.helpers import make_plan

    plan = make_plan("llama", max_batch_tokens=64, max_seqs=8)
    with executors.load(plan, kv_blocks=64) as eng:
        model = eng.local.model
        sched = Scheduler(64, plan.scheduler.block_size, 64, 8)
        seqs = [Seq(req=i, tokens=list(range(3 + 5 * i, 3 + 5 * i + n)), prompt_len=n, max_new=4)
                for i, n in enumerate([5, 11, 3])]
        for s in seqs:
            sched.add(s)
        chunks, _ = sched.schedule()
        with torch.inference_mode():
            model.forward(build_microbatch(chunks, "tp", plan.scheduler.block_size, None), None)
        for c in chunks:
            c.seq.computed += c.n
            c.seq.tokens.append(7)
        chunks, _ = sched.schedule()
        mb = build_microbatch(chunks, "tp", plan.scheduler.block_size, None)
        graphs = DecodeGraphs(model, plan.scheduler.max_seqs)
        assert graphs.accepts(mb, "tp") and not graphs.accepts(mb, "sp_tp")
        assert graphs.shape(mb) == (4, 512) == (bucket(3, graphs.sizes), keys_bucket(12))
        assert [keys_bucket(n) for n in (1, 512, 513, 1000, 2048, 2049)] == [512, 512, 1024, 1024, 2048, 4096]
        with torch.inference_mode():
            want = model.forward(mb, None)
            got = graphs.padded(mb, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


PAGED_CHECK = """
import torch
from executors.paged_decode import paged_decode, store_kv
from plans.engine_shapes import splits
torch.manual_seed(0)
_empty = torch.empty
def _nan_empty(*a, **kw):  # the kernels' scratch starts as NaN: a range the combine reads must be one written
    t = _empty(*a, **kw)
    return t.fill_(float("nan")) if t.is_floating_point() else t
torch.empty = _nan_empty
kc, vc = torch.zeros(9, 2, 6), torch.zeros(9, 2, 6)
qkv = torch.randn(3, 2 + 2 + 2, 6)  # k and v as strided views of one projection, as in a layer
k, v = qkv[:, 2:4], qkv[:, 4:]
store_kv(kc, vc, torch.tensor([5, -1, 0]), k, v)
assert torch.equal(kc[5], k[0]) and torch.equal(vc[0], v[2]) and torch.equal(kc[8], k[1]), "store_kv"
assert kc[1:5].abs().sum() == 0 and vc[6:8].abs().sum() == 0, "store_kv wrote other slots"
worst = 0.0
for S, hq, hkv, D, bs, dt in [(3, 8, 2, 16, 4, torch.float32), (5, 32, 8, 128, 16, torch.float16),
                              (2, 4, 4, 80, 16, torch.float16), (12, 8, 1, 16, 4, torch.float32),
                              (40, 16, 8, 16, 4, torch.float32)]:  # 320 programs: one range, no combine
    k = torch.randn(1024 * bs + 1, hkv, D).to(dt)
    v = torch.randn_like(k)
    lens = torch.randint(1, 20 * bs, (S,))
    nb = int((lens.max() + bs - 1) // bs) + 1
    table = torch.randperm(1024)[:S * nb].view(S, nb)
    q = torch.randn(S, hq, D).to(dt)
    got = paged_decode(q, k, v, table, lens, bs).float()
    assert torch.isfinite(got).all(), "a result read scratch no range wrote"
    ref = []
    for i in range(S):
        slots = (table[i][:, None] * bs + torch.arange(bs)).flatten()[:int(lens[i])]
        K = k[slots].float().repeat_interleave(hq // hkv, 1)
        V = v[slots].float().repeat_interleave(hq // hkv, 1)
        p = (torch.einsum("hd,lhd->hl", q[i].float(), K) * D ** -0.5).softmax(-1)
        ref.append(torch.einsum("hl,lhd->hd", p, V).reshape(-1))
    ref = torch.stack(ref)
    worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
assert splits(1, 8, 1024) == (16, 64) and splits(128, 8, 1024) == (1, 1024), (splits(1, 8, 1024), splits(128, 8, 1024))
assert splits(40, 8, 21 * 4)[0] == 1, "the last case must take the one-range path"
print(worst)
"""


def test_paged_decode_kernel_matches_reference() -> None:
    """The Triton paged-decode kernel (run by Triton's interpreter on CPU) against a per-sequence
    softmax over the keys its block table names: random tables, contexts, split counts, head
    groups and a head size that is not a power of two (the ranges combined by the second kernel, or
    one range written directly; ranges past a shorter sequence's keys are neither written nor read:
    the scratch starts as NaN);
    and the KV store kernel writing strided views at their slots, padding at the scratch slot."""
    assert float(run_interpreted("-c", PAGED_CHECK).split()[-1]) < 2e-3


GEMV_CHECK = """
import torch
from executors import gemv
torch.manual_seed(0)
worst = 0.0
for M, N, K, cfg in [(1, 40, 64, (16, 32, 4)), (3, 33, 96, (8, 64, 4)), (4, 16, 40, (16, 32, 4)),
                     (2, 64, 512, (32, 256, 4))]:
    x, w = torch.randn(M, K), torch.randn(N, K)
    ref = x @ w.t()
    worst = max(worst, float((gemv.launch(x, w, config=cfg) - ref).abs().max() / ref.abs().max()))
    gu = torch.randn(M, 2 * K)  # [gate | up]: the product of silu(gate) * up
    ref = (torch.nn.functional.silu(gu[:, :K]) * gu[:, K:]) @ w.t()
    worst = max(worst, float((gemv.launch(gu, w, config=cfg, gated=True) - ref).abs().max() / ref.abs().max()))
    b = torch.randn(N)  # a bias, added in the epilogue (Qwen's QKV)
    ref = x @ w.t() + b
    worst = max(worst, float((gemv.launch(x, w, config=cfg, b=b) - ref).abs().max() / ref.abs().max()))
print(worst)
"""


def test_gemv_kernel_matches_matmul() -> None:
    """The Triton GEMV of decode steps (run by Triton's interpreter on CPU) against ``x @ W^T``:
    1 to 4 rows, output and reduction lengths that are not multiples of the tile (masked edges);
    with a bias; and gated (the MLP's ``down`` of ``silu(gate) * up`` read from ``[gate | up]``)."""
    assert float(run_interpreted("-c", GEMV_CHECK).split()[-1]) < 1e-5


def test_gemv_is_routed_only_for_few_cuda_rows() -> None:
    """``quant.linear`` sends a product to the GEMV only for CUDA bf16/fp16 inputs of at most
    MAX_M rows; its fake kernel gives the output shape (what compiled layers trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from executors import gemv

    w = torch.zeros(8, 16)
    assert not gemv.wanted(torch.zeros(1, 16), w)  # CPU
    with FakeTensorMode():
        assert torch.ops.shiftplan.gemv(torch.empty(3, 16), torch.empty(8, 16)).shape == (3, 8)
        assert torch.ops.shiftplan.gemv(torch.empty(3, 16), torch.empty(8, 16), False, torch.empty(8)).shape == (3, 8)
        if torch.cuda.is_available():
            wc = torch.empty(8, 16, dtype=torch.bfloat16, device="cuda")
            assert gemv.wanted(torch.empty(4, 16, dtype=torch.bfloat16, device="cuda"), wc)
            assert not gemv.wanted(torch.empty(5, 16, dtype=torch.bfloat16, device="cuda"), wc)
            x1 = torch.empty(1, 16, dtype=torch.bfloat16, device="cuda")
            assert gemv.wanted(x1, wc, b=torch.empty(8, dtype=torch.bfloat16, device="cuda"))
            assert not gemv.wanted(x1, wc, b=torch.empty(8, dtype=torch.float32, device="cuda"))


PREFILL_CHECK = """
import sys
import torch
from executors import paged_prefill
from executors.attention import prefill_inputs, sequence_spans, split_decodes
from plans import engine_shapes
from tests.test_exec_gpu_paths import BLOCK, _packed_reference
per = int(sys.argv[1])  # keys per range; 0: the defaults (one range at these contexts)
if per:  # the interpreter's scale: ranges of 16 keys, read 16 at a time
    paged_prefill.BLOCK_N = engine_shapes.MAX_KEYS_PER_SPLIT = per
other = paged_prefill.KernelConfig(32, 32, 8, 2)  # another launch: 32 tokens a program, 32 keys a step
worst, ranges = 0.0, 1
for seed, chunks in [(1, [(12, 0, 12), (30, 29, 1), (20, 8, 5), (17, 16, 1), (6, 5, 1)]),
                     (2, [(40, 0, 40), (23, 3, 20)]), (3, [(45, 30, 10), (36, 35, 1), (8, 0, 8)])]:
    mb, q, k, v, _, cache, want = _packed_reference(seed, chunks, None)
    cache.k[mb.slots], cache.v[mb.slots] = k, v
    spans = sequence_spans(mb)
    seqs, _decodes = split_decodes(mb, spans, BLOCK, q.device)
    for part in (spans, seqs):  # every sequence in the kernel, or what the decodes left
        pre = prefill_inputs(mb, spans, part, BLOCK, q.device)
        ranges = max(ranges, paged_prefill.splits(pre.table.shape[1] * BLOCK, 1)[0])
        seq_of, row0 = (torch.tensor(x) for x in paged_prefill.programs(part, other.block_m))
        for got in (paged_prefill.attend(q, cache.k, cache.v, pre),
                    paged_prefill.paged_prefill(q, cache.k, cache.v, pre.table, pre.t0, pre.nq, pre.ctx, seq_of, row0,
                                                BLOCK, config=other)):
            rows = [t for t0, n, _k0, _ctx in part for t in range(t0, t0 + n)]
            worst = max(worst, float((got[rows] - want[rows]).abs().max()))
            others = [t for t in range(mb.num_tokens) if t not in set(rows)]
            assert not got[others].abs().sum(), "rows of no listed sequence were written"
print(ranges, worst)
"""


@pytest.mark.parametrize("per", [0, 16])
def test_paged_prefill_kernel_matches_packed_attention(per: int) -> None:
    """The Triton paged prefill kernel (Triton's interpreter on CPU) against the packed path on
    mixed micro-batches: first chunks, chunks after cached keys (causal from their position), single
    decodes, 8 query heads over 2 KV heads, keys read through scattered blocks; with every sequence
    in the kernel, and with only what ``split_decodes`` leaves (the decodes' rows untouched). With
    ``per`` = 16, keys in ranges of 16 (up to 3 a table): decodes of 17-36 keys, chunks after cached
    keys crossing range boundaries, a first chunk whose first tokens' keys fit one range (written
    directly, the ranges past them empty) and whose later tokens' span two and three, combined. Each
    case also through another launch (``KernelConfig``: 32 tokens a program, 32 keys a step)."""
    ranges, worst = run_interpreted("-c", PREFILL_CHECK, str(per)).split()[-2:]
    assert int(ranges) == (3 if per else 1) and float(worst) < 1e-4


def test_a_captured_steps_decode_ranges_are_cut_for_a_few_decodes_not_its_slots() -> None:
    """``engine_shapes.graph_splits`` (a captured mixed step's decodes over its ``S`` sequence slots): one
    range where the key bucket fits one (no combine over every slot), else the ranges a decode step of
    ``GRAPH_FILL_SEQS`` sequences would take, more than the slots' count would give."""
    from plans.engine_shapes import GRAPH_FILL_SEQS, MAX_KEYS_PER_SPLIT, graph_splits, splits

    for hkv in (8, 4):
        for keys in (512, MAX_KEYS_PER_SPLIT):
            assert graph_splits(257, hkv, keys) == (1, keys)
        for keys in (2048, 4096, 8192):
            assert graph_splits(257, hkv, keys) == splits(GRAPH_FILL_SEQS, hkv, keys)
        assert graph_splits(257, hkv, 2048)[0] > splits(257, hkv, 2048)[0]
    assert graph_splits(4, 8, 2048) == splits(4, 8, 2048)  # fewer slots than that: their own count


def test_prefill_key_ranges_follow_the_table_width(monkeypatch) -> None:
    """``paged_prefill.splits``: ranges of at most the decode kernel's cap (read from
    ``plans.engine_shapes``), in whole BLOCK_N, counted from the table's width alone; one range up to the
    cap; fewer, longer ranges where their scratch would pass SCRATCH_BYTES."""
    from executors.paged_prefill import BLOCK_N, SCRATCH_BYTES, splits
    from plans import engine_shapes

    cap = engine_shapes.MAX_KEYS_PER_SPLIT
    assert splits(512, 1) == (1, 512) and splits(cap, 1) == (1, cap) and splits(40, 1) == (1, BLOCK_N)
    assert splits(4 * cap, 1) == (4, cap) and splits(4 * cap - 16, 1) == (4, cap)
    n, per = splits(cap + 100, 1)  # a table not in whole ranges: two of whole BLOCK_N, covering it
    assert n == 2 and per % BLOCK_N == 0 and per <= cap and n * per >= cap + 100
    assert splits(16 * cap, SCRATCH_BYTES // 4) == (4, 4 * cap)  # the scratch holds 4 ranges
    assert splits(16 * cap, SCRATCH_BYTES + 1) == (1, 16 * cap)
    monkeypatch.setattr(engine_shapes, "MAX_KEYS_PER_SPLIT", 2 * cap)
    assert splits(4 * cap, 1) == (2, 2 * cap)
    monkeypatch.setattr(engine_shapes, "MAX_KEYS_PER_SPLIT", 0)  # no cap: one range
    assert splits(4 * cap, 1) == (1, 4 * cap)


def test_paged_prefill_kernels_do_not_compile_again_for_a_new_step_size() -> None:
    """The integers that change from one eager step to the next (its tokens ``T``, its table's width
    ``stride_ts``, the range length ``keys_per_split``) are not specialised on: Triton would compile the
    kernels again for each new value's divisibility by 16 (on an H200: 5 variants for 9 step shapes,
    0.8-2.2 s each, against 2, one for each ``SPLIT``; bench/results/prefill_variants.txt). The ones
    fixed for a stage (strides of q, KV and output) stay specialised."""
    from executors import paged_prefill

    for fn, varying in ((paged_prefill._prefill, {"T", "keys_per_split", "stride_ts"}),
                        (paged_prefill._combine, {"T", "keys_per_split"})):
        loose = {p.name for p in fn.params if p.do_not_specialize}
        assert loose == varying, (fn.__name__, loose)


def test_paged_prefill_kernels_compile_for_hopper() -> None:
    """The paged prefill kernels as the H200 would run them, compiled for sm_90 here (Qwen2-VL-7B's
    heads: 7 query heads a KV head, head dim 128, bf16; int64 inputs, as a graph's static buffer
    holds them): the key blocks' products on the tensor cores (wgmma) with and without key ranges,
    and the ranges' combine, which multiplies no matrices."""
    import triton
    from triton.backends.compiler import GPUTarget

    from executors import paged_prefill

    ints = {n: "*i64" for n in ("SEQ_OF", "ROW0", "T0", "NQ", "CTX")}
    shape = {"G": 7, "G_P": 8, "D": 128, "BLOCK_D": 128, "BLOCK_M": paged_prefill.BLOCK_M}
    const = {n: "constexpr" for n in shape}

    def ptx(fn, sig: dict, constexprs: dict) -> str:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "OUT": "*fp32", "LSE": "*fp32", "TABLE": "*i64",
           **ints, **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_kslot", "stride_kh", "stride_ts",
                                         "stride_ot", "keys_per_split", "T")},
           "scale": "fp32", **const, "BS": "constexpr", "BLOCK_N": "constexpr", "SPLIT": "constexpr"}
    for split in (False, True):
        assert "wgmma" in ptx(paged_prefill._prefill, sig, {**shape, "BS": 16, "BLOCK_N": paged_prefill.BLOCK_N,
                                                          "SPLIT": split})
    sig = {"OUT": "*fp32", "LSE": "*fp32", "O": "*bf16", **ints, "stride_ot": "i32", "keys_per_split": "i32",
           "T": "i32", **const}
    assert "mma" not in ptx(paged_prefill._combine, sig, shape)

MIXED_GRAPH_CHECK = """
import sys
import torch
import executors
from executors import Request
from executors import paged_prefill
from executors.graphs import DecodeGraphs, MixedGraphs
from executors.images import ImageInput
from executors.requests import make_seq
from executors.scheduler import Scheduler, Seq, build_microbatch
from plans import engine_shapes
from tests.tiny.helpers import make_plan

name, per, decodes = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if per:  # key ranges of ``per`` keys (the kernel's default cap leaves these contexts in one)
    paged_prefill.BLOCK_N = engine_shapes.MAX_KEYS_PER_SPLIT = per
plan = make_plan(name, max_batch_tokens=64, max_seqs=8)
bs = plan.scheduler.block_size
with executors.load(plan, kv_blocks=64) as eng:
    model, a = eng.local.model, eng.args
    sched = Scheduler(64, bs, 24, 8)  # a 24-token budget: the long prompt is cut into chunks
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([5, 11, 30]):
        toks = list(range(3 + 5 * i, 3 + 5 * i + n))
        if a.vision is not None and i != 1:  # an image in the first and the chunked prompt
            grid = (1, 4, 4)
            toks[2] = a.image_token_id
            req = Request(tokens=toks, images=[ImageInput(torch.randn(16, a.vision.patch_dim, generator=g), grid)])
        else:
            req = Request(tokens=toks)
        sched.add(make_seq(i, req, a, 4, None, 64 * bs))
    graphs = MixedGraphs(model, 64, 8, DecodeGraphs(model, 8))
    assert graphs.decode_kernel  # the default; "prefill": every sequence in the paged prefill kernel
    graphs.decode_kernel = decodes == "kernel"
    worst, kinds, image_steps = 0.0, set(), 0
    with torch.inference_mode():
        for _ in range(5):  # first chunks; then chunks after cached keys beside decodes
            chunks, _ = sched.schedule()
            mb = build_microbatch(chunks, "tp", bs, a.image_token_id)
            if mb.decode:
                break
            kinds.add(tuple(sorted({c.n == 1 for c in chunks})))
            image_steps += bool(mb.img_tok.numel())
            model.receive_images(mb.images)
            got = graphs.padded(mb, None)  # runs first: both write the same keys at the same slots
            want = model.forward(mb, None)
            assert got.shape == want.shape, (got.shape, want.shape)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            for c in chunks:
                c.seq.computed += c.n
                if c.seq.computed >= c.seq.prompt_len:
                    c.seq.tokens.append(7)
    assert (True,) in kinds or (False, True) in kinds, f"no step mixed decodes with prefill chunks: {kinds}"
    assert graphs.images == (a.vision is not None) and (image_steps > 0) == graphs.images, image_steps
    T, S, L = graphs.shape(mb)
    assert T in graphs.sizes and S <= T and L % bs == 0
print(paged_prefill.splits(L, 1)[0], worst)
"""


@pytest.mark.parametrize("name, per, decodes", [("llama", 0, "kernel"), ("qwen2_vl", 0, "kernel"),
                                                ("llama", 16, "kernel"), ("llama", 16, "prefill")])
def test_mixed_graph_inputs_give_the_eager_logits(name: str, per: int, decodes: str) -> None:
    """Prefill and mixed steps through ``MixedGraphs``' padded static inputs (token, sequence and
    key buckets; padding tokens at the scratch slot; padding programs on an empty sequence; the
    chunks in the paged prefill kernel, the decodes in the paged decode kernel at their rows, both run
    by Triton's interpreter; with ``decodes`` "prefill", the decodes in the prefill kernel too) give
    the eager step's logits: first chunks, a long prompt's later chunks after its cached keys, and
    decodes; for the VL model, image rows (and M-RoPE positions) through the static image buffer. With
    ``per`` = 16, the kernels' keys in ranges of 16: the key bucket's 512 keys make 32 ranges, most
    past every sequence's keys, the long prompt's later chunk spans two."""
    ranges, worst = run_interpreted("-c", MIXED_GRAPH_CHECK, name, str(per), decodes).split()[-2:]
    assert int(ranges) == (32 if per else 1) and float(worst) < 1e-4


def test_program_rows_cover_every_query_row_once() -> None:
    """The fixed-grid program list of a captured step: each sequence's rows cut into runs of
    BLOCK_M, in order, and the unused programs on the padding sequence."""
    from executors.paged_prefill import BLOCK_M, program_rows, programs

    nq = torch.tensor([1, 40, 0, 16, 17])
    t0 = torch.cumsum(nq, 0) - nq
    P = int(nq.sum()) // BLOCK_M + len(nq)
    seq_of, row0 = program_rows(nq, t0, P, pad_seq=5)
    spans = [(int(a), int(n), 0, 0) for a, n in zip(t0, nq)]
    want_seq, want_row = programs(spans)
    assert seq_of[:len(want_seq)].tolist() == want_seq and row0[:len(want_row)].tolist() == want_row
    assert seq_of[len(want_seq):].eq(5).all() and len(seq_of) == P
    seq_of, row0 = program_rows(nq, t0, P, pad_seq=5, decodes=False)  # the decode kernel takes sequence 0
    want_seq, want_row = programs([(a, n, k0, ctx) for a, n, k0, ctx in spans if n != 1])
    assert seq_of[:len(want_seq)].tolist() == [s + 1 for s in want_seq] and row0[:len(want_row)].tolist() == want_row
    assert 0 not in seq_of.tolist() and seq_of[len(want_seq):].eq(5).all()


def test_program_rows_stay_off_torchs_cpu_repeat_interleave(monkeypatch) -> None:
    """The host side of a graphed mixed step: no ``torch.repeat_interleave`` (its CPU kernel spreads
    over threads with a grain of one: 12-21 ms a mixed step on a 32-core GPU host)."""
    from executors.paged_prefill import program_rows

    def boom(*_a, **_k):
        raise AssertionError("torch.repeat_interleave called")

    monkeypatch.setattr(torch, "repeat_interleave", boom)
    nq = torch.tensor([32] + [1] * 32)
    seq_of, row0 = program_rows(nq, torch.cumsum(nq, 0) - nq, 68, pad_seq=64)
    assert seq_of[:3].tolist() == [0, 0, 1] and row0[:3].tolist() == [0, 16, 32] and seq_of[34:].eq(64).all()


def test_a_failing_prefill_kernel_leaves_the_step_to_per_sequence_sdpa(monkeypatch) -> None:
    """If the paged prefill kernel fails to build or launch (a Triton too old or new for the GPU), an
    eager step falls back to one SDPA per sequence with the same result, the failure is recorded once,
    and the kernel is no longer offered (``supported``), so no prefill graph is captured; a captured
    step's inputs have no spans to fall back on, so there the error propagates."""
    from executors import paged_prefill
    from executors.attention import prefill_inputs

    mb, q, k, v, _, cache, want = _packed_reference(3, [(12, 0, 12), (20, 8, 5)], None)
    spans = sequence_spans(mb)

    def broken(*_a, **_k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(paged_prefill, "paged_prefill", broken)
    monkeypatch.setattr(paged_prefill, "_failed", [])
    pre = prefill_inputs(mb, spans, spans, BLOCK, q.device)
    with pytest.warns(UserWarning, match="paged prefill kernel unavailable"):
        got = attend(q, k, v, cache, AttnMeta(mb.slots, mb.key_slots, None, seqs=spans, prefill=pre), None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert paged_prefill._failed and not paged_prefill.supported(torch.bfloat16, torch.bfloat16,
                                                                 torch.device("cuda"), False)
    with pytest.raises(RuntimeError, match="no kernel"):
        attend(q, k, v, cache, AttnMeta(mb.slots, None, None, block_size=BLOCK, prefill=pre), None)


def _graph_stage(sp: int = 2, a2a: bool = True):
    """What the graph classes read of a stage: a tiny last stage, ``sp`` ranks, the LL all-to-all or not."""
    from types import SimpleNamespace

    return SimpleNamespace(a=SimpleNamespace(mrope_section=None, vision=None, hidden=8, vocab=16, heads=4, kv_heads=2),
                           block_size=BLOCK,
                           par=SimpleNamespace(device=torch.device("cpu"), sp=sp), dtype=torch.float32, scratch_slot=3,
                           model=SimpleNamespace(embed=object(), lm_head=object()), paged_prefill_ok=True,
                           sp_a2a=object() if a2a else None)


def test_mixed_graphs_take_only_prefill_steps_that_fit() -> None:
    """``MixedGraphs.accepts``: prefill and mixed micro-batches in plain TP mode up to the largest
    token bucket, on a stage the kernel serves; SP x TP steps only where the stage's all-to-all is
    the LL kernel; not decodes (the decode graphs' job), not steps past the largest bucket."""
    from types import SimpleNamespace

    from executors.graphs import TOKEN_BUCKETS, MixedGraphs, bucket

    model = _graph_stage(a2a=False)
    g = MixedGraphs(model, max_tokens=100, max_seqs=8, pool_of=SimpleNamespace(pool=None))
    assert g.sizes[-1] == bucket(100, TOKEN_BUCKETS) and g.out.shape == (8, 16) and g.img is None
    mb = _microbatch([(12, 0, 12), (30, 29, 1), (20, 8, 5)])
    assert g.accepts(mb, "tp") and not g.accepts(mb, "sp_tp")
    T, S, L = g.shape(mb)
    assert T == bucket(mb.num_tokens, TOKEN_BUCKETS) and S == min(8, T) and L % BLOCK == 0 and L >= 30
    two = _microbatch([(12, 0, 12), (20, 3, 6)])  # 18 tokens too, in 2 sequences instead of 3: the same graph
    assert len(two.ctx) == 2 < len(mb.ctx) and two.num_tokens == mb.num_tokens and g.shape(two) == (T, S, L)
    dec = _microbatch([(12, 11, 1), (30, 29, 1)])
    assert dec.decode and not g.accepts(dec, "tp")
    big = _microbatch([(g.sizes[-1] + 1, 0, g.sizes[-1] + 1)])
    assert not g.accepts(big, "tp")
    model.sp_a2a = object()  # the LL all-to-all: SP x TP steps are captured too (buckets are even)
    assert g.accepts(mb, "sp_tp") and not g.accepts(dec, "sp_tp")
    model.paged_prefill_ok = False
    assert not g.accepts(mb, "tp") and not g.accepts(mb, "sp_tp")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 40)), min_size=1, max_size=6), st.booleans())
def test_warm_up_captures_every_graph_bucket_a_step_can_meet(seqs, a2a) -> None:
    """``capture_all`` captures ``buckets(modes)``: every micro-batch either graph class accepts, in
    either mode, maps to one of them (so no capture is left for serving), for contexts up to
    ``max_keys``; past it neither accepts the step (it runs eagerly)."""
    from executors.graphs import DecodeGraphs, MixedGraphs

    model, modes = _graph_stage(a2a=a2a), ("tp", "sp_tp")
    dec = DecodeGraphs(model, 24, max_keys=3000)
    mixed = MixedGraphs(model, 300, 24, dec, max_keys=3000)
    mb = _microbatch([(total, total - min(n, total), min(n, total)) for total, n in seqs])
    decode = _microbatch([(total, total - 1, 1) for total, _ in seqs])
    for g, shape, kinds in ((dec, dec.shape, (decode,)), (mixed, lambda m, _mode: mixed.shape(m), (mb, decode))):
        keys = set(g.buckets(modes))
        assert len(keys) == len(g.buckets(modes))  # each once: the order is every rank's capture order
        for m in kinds:
            for mode in modes:
                if g.accepts(m, mode):
                    assert (*shape(m, mode), mode) in keys
    assert dec.accepts(decode, "tp") and dec.accepts(decode, "sp_tp") == a2a
    longest = _microbatch([(4097, 4096, 1)])  # past max_keys' bucket (4,096 keys)
    assert not dec.accepts(longest, "tp") and not mixed.accepts(_microbatch([(4097, 4000, 97)]), "tp")


def test_padding_only_inputs_name_no_sequence() -> None:
    """The inputs a warm-up capture runs on (``_pack`` of no micro-batch): every token writes the
    scratch slot; decode rows read one key; every prefill program points at the empty sequence ``S``."""
    from executors.graphs import DecodeGraphs, MixedGraphs

    model = _graph_stage()
    dec = DecodeGraphs(model, 8, max_keys=600)
    B, L = 8, dec.key_sizes[-1]
    buf = torch.full((dec._size(B, L),), -7, dtype=torch.long)
    dec._pack(buf, None, B, L)
    tok, pos, slots, lens, table = dec._views(buf, B, L)
    assert (slots == 3).all() and (lens == 1).all() and not tok.any() and not pos.any() and not table.any()
    mixed = MixedGraphs(model, 64, 8, dec, max_keys=600)
    T, S = 64, 8
    buf = torch.full((mixed._size(T, S, L),), -7, dtype=torch.long)
    mixed._pack(buf, None, T, S, L)
    tok, pos, slots, flag, sample, seqs, progs, table = mixed._views(buf, T, S, L)
    assert (slots == 3).all() and (progs[0] == S).all() and not progs[1].any() and not seqs.any()
    assert not (tok.any() or flag.any() or sample.any() or table.any())


def test_an_unknown_paged_prefill_setting_is_named_and_auto_is_used() -> None:
    """``SHIFTPLAN_PAGED_PREFILL`` other than auto, 0 or 1: one warning naming the value and the
    choices, and the default policy."""
    import os
    import subprocess
    import sys

    from tests.tiny.helpers import ROOT

    env = dict(os.environ, SHIFTPLAN_PAGED_PREFILL="yes", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "from executors import paged_prefill; print(paged_prefill.POLICY)"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "auto", out.stderr[-2000:]
    assert "SHIFTPLAN_PAGED_PREFILL='yes' is not one of auto, 0, 1" in out.stderr


REDUCE_NORM_CHECK = """
import torch
from executors import reduce_norm
from executors.layers import rms_norm
torch.manual_seed(0)
worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
pushed = True
for n, H, world, dt in [(1, 64, 2, torch.float32), (5, 96, 2, torch.float32), (3, 40, 4, torch.bfloat16),
                        (40, 32, 2, torch.float32), (2, 128, 8, torch.bfloat16)]:
    parts = [torch.randn(n, H).to(dt) for _ in range(world)]
    slot = n * H + 5
    bufs = [torch.zeros(world * slot, dtype=dt) for _ in range(world)]
    rank = world - 1
    for j, p in enumerate(parts):  # what the other ranks pushed into this rank's buffer
        if j != rank:
            bufs[rank][j * slot:j * slot + n * H] = p.flatten()
    res, w = torch.randn(n, H).to(dt), torch.randn(H).to(dt)
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    h, y = reduce_norm.launch(parts[rank], res, w, 1e-5, ptrs, slot, torch.zeros(world, dtype=torch.int64), 0,
                              rank, world, sync=False)
    pushed &= all(torch.equal(bufs[j][rank * slot:rank * slot + n * H], parts[rank].flatten()) for j in range(world))
    s = sum(p.float() for p in parts)
    href = s.to(dt) + res
    yref = rms_norm(href, w, 1e-5)
    err = max(float((h.float() - href.float()).abs().max() / href.float().abs().max()),
              float((y.float() - yref.float()).abs().max() / yref.float().abs().max()))
    worst[dt] = max(worst[dt], err)
print(pushed, worst[torch.float32], worst[torch.bfloat16])
"""


def test_fused_all_reduce_add_norm_kernel_interpreted() -> None:
    """The all-reduce + residual add + RMSNorm kernel (run by Triton's interpreter on CPU, flags
    off, every rank's buffer in one process) against the sum, the add and ``layers.rms_norm``:
    1-40 rows (more rows than programs: each program loops), widths that are not powers of two,
    2, 4 and 8 ranks; this rank's rows land in its slot of every rank's buffer."""
    pushed, fp32, bf16 = run_interpreted("-c", REDUCE_NORM_CHECK).split()[-3:]
    assert pushed == "True"
    assert float(fp32) < 1e-6 and float(bf16) < 1e-2



REDUCE_NORM_LL_CHECK = """
import torch
from executors import reduce_norm
torch.manual_seed(0)
worst, pushed, counted, exact = 0.0, True, True, True
tb = lambda x: (x.contiguous().view(torch.int32) & -65536).view(torch.float32)
for n, H, world in [(1, 64, 2), (5, 96, 2), (3, 40, 4), (40, 32, 2)]:
    words, rank = n * H // 2 + 3, world - 1
    bufs = [torch.zeros(reduce_norm.ll_words(words, world), dtype=torch.int64) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    for seq in (1, 2):  # two calls: the halves alternate, the counters advance
        parts = [torch.randn(n, H).to(torch.bfloat16) for _ in range(world)]
        half = (seq % 2) * world
        for j, p in enumerate(parts):  # what the other ranks pushed: seq in the high word, two bf16 below
            if j != rank:
                bits = p.view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
                bufs[rank][(half + j) * words:(half + j) * words + bits.numel()] = (seq << 32) | bits
        res, w = torch.randn(n, H).to(torch.bfloat16), torch.randn(H).to(torch.bfloat16)
        h, y = reduce_norm.launch_ll(parts[rank], res, w, 1e-5, ptrs, words, rank, world)
        mine = (seq << 32) | (parts[rank].view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF)
        at = (half + rank) * words
        pushed &= all(torch.equal(bufs[j][at:at + mine.numel()], mine) for j in range(world) if j != rank)
        counted &= bool((bufs[rank][2 * world * words:] == seq).all())  # every program's counter
        # the interpreter rounds fp32 -> bf16 by truncation (the GPU to nearest): the reference does too
        href = tb(tb(sum(p.float() for p in parts)) + res.float())
        yref = tb(tb(href * torch.rsqrt((href * href).mean(-1, keepdim=True) + 1e-5)) * w.float())
        exact &= torch.equal(h.float(), href)
        worst = max(worst, float((y.float() - yref).abs().max() / yref.abs().max()))
print(pushed, counted, exact, worst)
"""


def test_fused_all_reduce_ll_kernel_interpreted() -> None:
    """The LL protocol's kernel (``SHIFTPLAN_REDUCE_LL``; Triton's interpreter, every rank's buffer in
    one process, the peers' words written first) against the rank-order sum, the add and the RMSNorm
    with bf16 rounding as the interpreter does it: ``h`` bit for bit, ``y`` within its rounding; two
    calls (the buffer halves alternate with the sequence number, the counters advance), 1-40 rows,
    widths that are not powers of two, 2 and 4 ranks; this rank's words (its sequence number over its
    two bf16 values) land in its slot of every peer's buffer."""
    pushed, counted, exact, err = run_interpreted("-c", REDUCE_NORM_LL_CHECK).split()[-4:]
    assert pushed == "True" and counted == "True" and exact == "True"
    assert float(err) < 1e-2


def test_fused_all_reduce_ll_compiles_for_hopper() -> None:
    """The LL kernel as the H200 would run it, compiled for sm_90 here: 64-bit stores of the words
    to the peer and volatile 64-bit loads polling its own buffer, bf16 rounded to nearest, and no
    atomic or memory fence (the flag travels in the data word; the only barriers are the CTA's own,
    of its reductions)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from executors import reduce_norm

    sig = {"X": "*i32", "R": "*i32", "W": "*i32", "Hout": "*i32", "Y": "*i32", "bufs": "*i64", "words": "i32",
           "n": "i32", "H2": "i32", "eps": "fp32", "RANK": "constexpr", "WORLD": "constexpr",
           "BLOCK": "constexpr", "USE_GDC": "constexpr"}
    src = triton.compiler.ASTSource(fn=reduce_norm._reduce_add_norm_ll, signature=sig, constexprs={
        "RANK": 0, "WORLD": 2, "BLOCK": 2048, "USE_GDC": True})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    assert "st.global.b64" in body and "ld.volatile.global.b64" in body and "cvt.rn.bf16" in body
    assert not any(op in body for op in ("atom.", "membar", "fence."))
    assert body.index("griddepcontrol.wait") < body.index("st.global.b64")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # what compiled layers trace
        x = torch.empty(3, 64, dtype=torch.bfloat16)
        h, y = torch.ops.shiftplan.reduce_add_norm_ll(x, x, torch.empty(64, dtype=torch.bfloat16), 1e-5,
                                                      torch.empty(2, dtype=torch.int64), 4096, 0, 2)
        assert h.shape == y.shape == (3, 64) and h.dtype == y.dtype == torch.bfloat16


def test_fused_all_reduce_add_norm_compiles_for_hopper() -> None:
    """The fused kernel's flags and dependent launch as the H200 runs them, compiled for sm_90 here
    (no GPU needed; ptxas ships with Triton): two flag exchanges a call, each a system-scope
    release compare-and-swap 0 -> 1 and an acquire 1 -> 0, and ``griddepcontrol`` only when
    launched as a dependent launch."""
    import triton
    from triton.backends.compiler import GPUTarget

    from executors import reduce_norm

    sig = {"X": "*bf16", "R": "*bf16", "W": "*bf16", "Hout": "*bf16", "Y": "*bf16", "bufs": "*i64", "stride": "i32",
           "pads": "*i64", "flags": "i32", "n": "i32", "H": "i32", "eps": "fp32", "RANK": "constexpr",
           "WORLD": "constexpr", "BLOCK": "constexpr", "SYNC": "constexpr", "USE_GDC": "constexpr"}
    for gdc in (False, True):
        src = triton.compiler.ASTSource(fn=reduce_norm._reduce_add_norm, signature=sig, constexprs={
            "RANK": 1, "WORLD": 2, "BLOCK": 4096, "SYNC": True, "USE_GDC": gdc})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        assert ptx.count("atom.global.release.sys.cas.b32") == 2 and ", 0, 1;" in ptx
        assert ptx.count("atom.global.acquire.sys.cas.b32") == 2 and ", 1, 0;" in ptx
        assert ("griddepcontrol.wait" in ptx) == gdc
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # what compiled layers trace: the op's two outputs, shaped as its input
        x, ptrs = torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(2, dtype=torch.int64)
        h, y = torch.ops.shiftplan.reduce_add_norm(x, x, torch.empty(64, dtype=torch.bfloat16), 1e-5, ptrs, 4096,
                                                   ptrs, 0, 0, 2)
        assert h.shape == y.shape == (3, 64) and h.dtype == y.dtype == torch.bfloat16


def test_sp_padding_rows_keep_the_table_decode_path() -> None:
    """Under SP a decode step of 3 sequences is padded to 4 queries: the padded block table gives
    each padding row one key (block 0's first) and leaves the real rows' attention unchanged."""
    from executors.stage import StageModel

    g = torch.Generator().manual_seed(3)
    hq, hkv, D = 8, 2, 16
    mb = _microbatch([(30, 29, 1), (7, 6, 1), (18, 17, 1)])
    cache = _cache(200, hkv, D, g)
    table, lens = StageModel.padded_table(mb, 4, torch.device("cpu"))
    assert table.shape == (4, max(len(b) for b in mb.blocks)) and lens.tolist() == mb.ctx + [1]
    assert table[3].eq(0).all()
    q = torch.randn(4, hq, D, generator=g)

    def meta(t: torch.Tensor, n: torch.Tensor) -> AttnMeta:
        mask = torch.arange(t.shape[1] * BLOCK)[None, :] < n[:, None]
        return AttnMeta(None, None, None, seq_mask=mask, table=t, block_size=BLOCK)

    padded = _attend_decode_grouped(q, cache, meta(table, lens), None)
    real = _attend_decode_grouped(q[:3], cache, meta(table[:3], lens[:3]), None)
    torch.testing.assert_close(padded[:3], real)
    assert torch.isfinite(padded[3]).all()


ALL_TO_ALL_LL_CHECK = """
import torch
from executors import all_to_all as a2a
torch.manual_seed(0)
pushed, counted, exact = True, True, True
for shape, world, dt in [((2, 3, 5, 4), 2, torch.bfloat16), ((4, 2, 7, 2), 4, torch.bfloat16), ((2, 1500), 2, torch.float32),
                         ((2, 2600), 2, torch.bfloat16)]:
    n = (torch.empty(shape, dtype=dt)[0].numel() * torch.empty(0, dtype=dt).element_size()) // 4
    words, rank = n + 3, world - 1
    bufs = [torch.zeros(a2a.ll_words(words, world), dtype=torch.int64) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    for seq in (1, 2):  # two calls: the halves alternate, the counters advance
        xs = [torch.randn(shape).to(dt) for _ in range(world)]  # every rank's input
        half = (seq % 2) * world
        for j in range(world):  # what the other ranks pushed here: their chunk for this rank, seq above
            if j != rank:
                bits = xs[j][rank].contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
                bufs[rank][(half + j) * words:(half + j) * words + n] = (seq << 32) | bits
        out = a2a.launch(xs[rank], ptrs, words, rank, world)
        exact &= all(torch.equal(out[i].view(torch.int32 if dt == torch.float32 else torch.int16),
                                 xs[i][rank].view(torch.int32 if dt == torch.float32 else torch.int16)) for i in range(world))
        at = (half + rank) * words
        for j in range(world):
            if j != rank:
                mine = (seq << 32) | (xs[rank][j].contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF)
                pushed &= torch.equal(bufs[j][at:at + n], mine)
        counted &= bool((bufs[rank][2 * world * words:] == seq).all())
print(pushed, counted, exact)
"""


def test_all_to_all_ll_kernel_interpreted() -> None:
    """Ulysses' LL all-to-all (``executors.all_to_all``; Triton's interpreter, every rank's buffer in one
    process, the peers' words written first): each chunk arrives bit for bit (bf16 and fp32 moved as
    32-bit words), two calls (the buffer halves alternate with the sequence number, the counters
    advance), 2 and 4 ranks, chunks longer than a program's block; this rank's chunk for each peer lands
    in its slot of that peer's buffer with the call's sequence number above it."""
    pushed, counted, exact = run_interpreted("-c", ALL_TO_ALL_LL_CHECK).split()[-3:]
    assert pushed == "True" and counted == "True" and exact == "True"


def test_all_to_all_ll_compiles_for_hopper() -> None:
    """The LL all-to-all as the H200 would run it, compiled for sm_90 here: 64-bit stores to the peer,
    volatile 64-bit polls of its own buffer, no atomic or memory fence; its op traces under fake tensors."""
    import triton
    from triton.backends.compiler import GPUTarget

    from executors import all_to_all

    sig = {"X": "*i32", "OUT": "*i32", "bufs": "*i64", "words": "i32", "n": "i32", "RANK": "constexpr",
           "WORLD": "constexpr", "BLOCK": "constexpr", "USE_GDC": "constexpr"}
    src = triton.compiler.ASTSource(fn=all_to_all._all_to_all_ll, signature=sig, constexprs={
        "RANK": 1, "WORLD": 2, "BLOCK": all_to_all.BLOCK, "USE_GDC": True})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    assert "st.global.b64" in body and "ld.volatile.global.b64" in body
    assert not any(op in body for op in ("atom.", "membar", "fence."))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8, 4, dtype=torch.bfloat16)
        out = torch.ops.shiftplan.all_to_all_ll(x, torch.empty(2, dtype=torch.int64), 1024, 0, 2)
        assert out.shape == x.shape and out.dtype == x.dtype


def _sp_decode_rank(rank: int, port: int, out: dict) -> None:
    """One sp rank of an sp2 plan (gloo): prefill three prompts, then one decode step of 3 sequences
    (padded to 4) eagerly and through ``DecodeGraphs.padded`` in SP x TP mode, the rows gathered by
    all-gather and by the all-to-all path the LL kernel would take (a process group standing in)."""
    import torch.distributed as dist

    from executors.graphs import DecodeGraphs
    from executors.scheduler import Scheduler
    from tests.tiny.helpers import sp2_runner

    runner = sp2_runner(rank, port)
    model, bs = runner.model, runner.plan.scheduler.block_size
    sched = Scheduler(64, bs, 64, 8)
    for i, n in enumerate([5, 11, 3]):
        sched.add(Seq(req=i, tokens=list(range(3 + 5 * i, 3 + 5 * i + n)), prompt_len=n, max_new=4))
    chunks, _ = sched.schedule()
    with torch.inference_mode():
        model.forward(build_microbatch(chunks, "sp_tp", bs, None), None)
        for c in chunks:
            c.seq.computed += c.n
            c.seq.tokens.append(7)
        chunks, _ = sched.schedule()
        mb = build_microbatch(chunks, "sp_tp", bs, None)
        graphs = DecodeGraphs(model, 8)
        want = model.forward(mb, None)
        got = graphs.padded(mb, None, "sp_tp")  # rewrites the same keys at the same slots
        model.sp_a2a = model.par.sp_group  # the all-to-all gather
        got_a2a = graphs.padded(mb, None, "sp_tp")
    out[rank] = (graphs.shape(mb, "sp_tp"), float((got - want).abs().max() / want.abs().max()),
                 float((got_a2a - want).abs().max() / want.abs().max()))
    dist.destroy_process_group()


def test_sp_decode_graph_inputs_give_the_eager_logits() -> None:
    """An SP x TP decode step through the decode graph's padded inputs (its batch bucket a multiple
    of sp: 3 sequences -> 4 rows, 2 a rank) gives the eager step's logits on both sp ranks, with the
    rows gathered by all-gather and by an all-to-all of the rows repeated (the LL kernel's way)."""
    import os

    import torch.multiprocessing as mp

    from executors.engine import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.spawn(_sp_decode_rank, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        shape, err, err_a2a = out[rank]
        assert shape[0] == 4 and err < 1e-5 and err_a2a < 1e-5, out[rank]


SP_MIXED_GRAPH_CHECK = """
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from executors.graphs import DecodeGraphs, MixedGraphs
from executors.scheduler import Scheduler, Seq, build_microbatch
from executors.engine import free_port
from tests.tiny.helpers import sp2_runner


def rank_main(rank, port, out):
    runner = sp2_runner(rank, port)
    model, bs = runner.model, runner.plan.scheduler.block_size
    sched = Scheduler(64, bs, 24, 8)  # a 24-token budget: the long prompt is cut into chunks
    for i, n in enumerate([5, 11, 30]):
        sched.add(Seq(req=i, tokens=list(range(3 + 5 * i, 3 + 5 * i + n)), prompt_len=n, max_new=4))
    graphs = MixedGraphs(model, 64, 8, DecodeGraphs(model, 8))
    worst, steps = 0.0, 0
    with torch.inference_mode():
        for _ in range(5):
            chunks, _ = sched.schedule()
            mb = build_microbatch(chunks, "sp_tp", bs, None)
            if mb.decode:
                break
            model.sp_a2a = None if steps % 2 == 0 else model.par.sp_group  # both gathers
            got = graphs.padded(mb, None, "sp_tp")  # runs first: both write the same keys at the same slots
            want = model.forward(mb, None)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            steps += 1
            for c in chunks:
                c.seq.computed += c.n
                if c.seq.computed >= c.seq.prompt_len:
                    c.seq.tokens.append(7)
    out[rank] = (steps, worst)
    dist.destroy_process_group()


out = mp.Manager().dict()
mp.start_processes(rank_main, args=(free_port(), out), nprocs=2, start_method="fork", join=True)
print(min(out[r][0] for r in (0, 1)), max(out[r][1] for r in (0, 1)))
"""


def test_sp_mixed_graph_inputs_give_the_eager_logits() -> None:
    """SP x TP prefill and mixed steps through ``MixedGraphs``' padded static inputs (every sequence
    in the paged prefill kernel, run by Triton's interpreter, over all the step's tokens after the
    Ulysses all-to-all) give the eager step's logits on both gloo sp ranks: first chunks and a long
    prompt's later chunks, the rows gathered by all-gather and by an all-to-all of the rows repeated."""
    steps, worst = run_interpreted("-c", SP_MIXED_GRAPH_CHECK).split()[-2:]
    assert int(steps) >= 2 and float(worst) < 1e-4


def test_the_ll_all_to_all_holds_every_graphed_sp_chunk() -> None:
    """The LL all-to-all's buffer (``stage.graphed_chunk_bytes``) holds every chunk of a step a CUDA
    graph may hold (2,048 tokens), for every preset and SP x TP mesh its heads allow: a peer's share of
    the packed q, k, v (the rank's heads from ``HeadSplit``, KV heads replicated where fewer than the
    GPUs) and the hidden rows ``gather_rows`` sends; a chunk past it would fall back to NCCL's all-to-all,
    which hangs in a graph."""
    from executors.config import model_args
    from executors.stage import graphed_chunk_bytes
    from graph.hf_config import load_config, preset_names
    from plans.errors import UserError
    from plans.mesh import GRAPH_TOKEN_BUCKETS, HeadSplit

    checked = 0
    for name in preset_names():
        a = model_args(load_config(preset=name))
        for tp, sp in [(1, 2), (2, 2), (1, 4), (2, 4), (4, 2), (1, 8)]:
            try:
                hs = HeadSplit(a.heads, a.kv_heads, tp * sp)
            except UserError:
                continue
            rows = -(-GRAPH_TOKEN_BUCKETS[-1] // sp)
            for tp_i in range(tp):
                q, kv = len(hs.q_heads_sptp(tp_i, sp)), len(hs.kv_heads_sptp(tp_i, sp))
                packed = rows * (q + 2 * kv) * a.head_dim // sp * 2
                assert max(packed, rows * a.hidden * 2) <= graphed_chunk_bytes(a, sp, 2), (name, tp, sp, tp_i)
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_graph_chunks_give_the_eager_embeddings(name: str, monkeypatch) -> None:
    """``TowerGraphs`` cuts a step's images into runs of equal grids and power-of-two chunks, each
    encoded on its own (the CUDA graph is replaced here by the eager ``encode`` it captures): the
    rows come back in the images' order and equal one eager tower call over all of them."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from executors import tower_graphs
    from executors.config import model_args
    from executors.encoders import load_tower
    from executors.vision import vision_shapes
    from executors.weights import RandomSource
    from tests.tiny.helpers import config

    v = model_args(config(name)).vision
    tower = load_tower(v, RandomSource(vision_shapes(v), seed=3), torch.float32, torch.device("cpu"))

    class Eager:  # what a captured graph replays: encode over the static pixels
        def __init__(self, g, k, pixels):
            self.pixels, self.inputs, self.graph = pixels.clone(), tower.prepare([g] * k), self
            self.out = None

        def replay(self):
            self.out = tower.encode(self.pixels, self.inputs)

    graphs = tower_graphs.TowerGraphs(tower, max_patches=64)
    monkeypatch.setattr(graphs, "_capture", Eager)
    g = torch.Generator().manual_seed(0)
    grid = [(1, 4, 4)] * 3 + [(1, 8, 8)] * 2 + [(1, 4, 4)] * 5 + [(2, 4, 8)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grid), v.patch_dim, generator=g)
    with torch.inference_mode():
        want, got = tower(pixels, grid), graphs(pixels, grid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # (grid, count) graphs: 16 patches -> chunks of up to 4 images, 64 -> 1, 64 (t=2) -> 1
    assert set(graphs.graphs) == {((1, 4, 4), 2), ((1, 4, 4), 1), ((1, 8, 8), 1), ((1, 4, 4), 4), ((2, 4, 8), 1)}
    full = tower_graphs.TowerGraphs(tower, max_patches=64, max_graphs=2)  # at most 2: the rest launched
    monkeypatch.setattr(full, "_capture", Eager)
    with torch.inference_mode():
        torch.testing.assert_close(full(pixels, grid), want, rtol=1e-5, atol=1e-5)
    assert len(full.graphs) == 2

    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 300), st.integers(1, 5000), st.integers(1, 20000))
    def chunks_cover(n: int, patches: int, cap: int) -> None:
        ks = tower_graphs.chunks(n, patches, cap)
        assert sum(ks) == n and ks == sorted(ks, reverse=True)
        assert all(k & (k - 1) == 0 and (k == 1 or k * patches <= cap) for k in ks)
        assert len(ks) == len(set(ks)) or max(ks) * patches * 2 > cap  # only the cap repeats a count

    chunks_cover()


def test_decode_ranges_cover_every_key_in_capped_whole_blocks() -> None:
    """``engine_shapes.splits``: ranges of whole DECODE_BLOCK_N keys that together cover the table's
    width, at most ``MAX_KEYS_PER_SPLIT`` keys each where ``MAX_SPLITS`` allows, and enough programs to
    fill the GPU for small batches."""
    from plans import engine_shapes as pd

    for S in (1, 8, 32, 64, 128, 512):
        for hkv in (1, 4, 8):
            for width in (16, 512, 1000, 2048, 8192, 65536, 200_000):
                n, per = pd.splits(S, hkv, width)
                assert per % pd.DECODE_BLOCK_N == 0 and n * per >= width and 1 <= n <= pd.MAX_SPLITS
                if n < pd.MAX_SPLITS:
                    assert per <= max(pd.MAX_KEYS_PER_SPLIT, pd.DECODE_BLOCK_N)
                assert n * S * hkv >= min(pd.TARGET_PROGRAMS, S * hkv * min(-(-width // pd.DECODE_BLOCK_N), pd.MAX_SPLITS))


def test_graph_decodes_bench_compares_both_paths_of_a_captured_step(tmp_path) -> None:
    """``bench/graph_decodes.py --tiny`` (Triton's interpreter): a captured step's attention with its
    decodes in the paged prefill kernel and in the paged decode kernel at their rows gives the same
    output, with and without decodes in the step."""
    run_interpreted("bench/graph_decodes.py", "--out", str(tmp_path), "--tiny")
    rows = json.loads((tmp_path / "graph_decodes.json").read_text())["rows"]
    assert {r["decodes"] for r in rows} == {0, 3} and all(r["max_abs_diff"] < 1e-5 for r in rows)
