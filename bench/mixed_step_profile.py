"""Where a captured mixed step's GPU time goes, kernel by kernel, beside the cost model's price of
the same step, op class by op class.

The cost model prices a graphed mixed step (prefill chunks beside decodes, replayed as a CUDA graph:
``executors.graphs.MixedGraphs``) from its op tables and adds ``mixed_step_ms`` (the step
trace's median residual, ``costmodels.steps.fit_mixed_step_ms``), which is not itemised. Here
one step of each ``--cases`` shape (a first chunk of C tokens beside D decodes of K keys) is formed by
the engine's scheduler, replayed through the engine's captured graph, and profiled, on the plan the
mixed extra was fitted on (a fidelity report's pinned case, ``--report``, ``--model``, ``--case``: its
``plan_yaml``; by default Llama-3.1-8B's ``single`` plan on one H200; bf16, random weights): the graph's kernels by time per step (``graphs.kernel_table``),
summed by class (matmuls, attention, norms, elementwise, KV store, other), beside the cost model's
price of each class for the same shape (``CostModel`` op by op, as ``ModelCoster`` composes a mixed
step: dense ops at the graph's padded rows, the chunk's and the decodes' attention apart, the decodes'
tail as the graph cuts their keys, the decode kernel's programs on empty slots), and the replay's GPU
time beside the coster's step price with and without ``mixed_step_ms``.

Run with ``SHIFTPLAN_PDL=0`` the kernels' times add up (with programmatic dependent launch a kernel's
time includes its wait for the one before).

    SHIFTPLAN_PDL=0 python bench/mixed_step_profile.py --out DIR
    python bench/mixed_step_profile.py --out DIR --tiny          # CPU dry run: shapes and prices only

Writes DIR/mixed_step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ((256, 0, 0), (128, 32, 800), (256, 16, 1500), (384, 48, 600), (256, 56, 1200), (1024, 24, 1000))
# the engine fuses the residual add into the next norm, and writes K and V (the model's attention op) in a
# kernel of its own: norms and elementwise ops are one class, the KV store is attention's
CLASSES = ("matmul", "attention", "norm + elementwise", "other")


def kernel_class(name: str) -> str:
    """The op class of a CUDA kernel's name in this engine's graphs."""
    n = name.lower()
    if any(k in n for k in ("nvjet", "gemm", "cutlass", "_gemv", "splitkreduce", "sm90_xmma")):
        return "matmul"
    if any(k in n for k in ("_partial", "_combine", "_prefill", "_attn", "paged", "flash")):
        return "attention"
    if "_store" in n:
        return "attention"
    if "rsqrt" in n or "norm" in n or n.startswith("triton_poi") or "elementwise" in n or "silu" in n:
        return "norm + elementwise"
    return "other"


def op_class(kind: str) -> str:
    """The class of a cost-model op kind (``OpRec.kind``)."""
    return {"matmul": "matmul", "lm_head": "matmul", "attention": "attention", "norm": "norm + elementwise",
            "rope": "norm + elementwise", "elementwise": "norm + elementwise",
            "activation": "norm + elementwise"}.get(kind, "other")


def model_price(cost: Any, coster: Any, C: int, D: int, K: int) -> dict[str, Any]:
    """The cost model's ms per class for one step of a C-token first chunk beside D decodes of K keys
    (the whole stage: decoder layers, embedding, final norm, lm_head), and the coster's step price."""
    import dataclasses

    from costmodels.opcost import op_time
    from graph.opgraph import StepShape

    if D:
        shape, dec = StepShape.from_sequences([C] + [1] * D, [C] + [K] * D)
        pre = StepShape(shape.tokens - dec.tokens, shape.pairs - dec.pairs, shape.kv - dec.kv, shape.seqs - dec.seqs)
    else:
        shape, dec, pre = StepShape.prefill([C]), None, StepShape.prefill([C])
    rows = cost.graph_rows(shape)
    layers = len(cost.decoders)
    out = dict.fromkeys(CLASSES, 0.0)

    def ms(r: Any, s: StepShape) -> float:
        c, m, o = op_time(r, s, 1, 1, cost.rates, cost.profile, True)
        return max(c, m) + o

    graph = cost.step_graph(shape, dec, sp=1, mode="tp", max_seqs=coster.max_seqs)
    for r in cost._recs[cost.decoders[0].name]:
        if r.kind == "attention":  # each part's pairs and keys priced apart, as the coster does: the part
            # less the same tokens without them, beside the whole step's attention without them
            t = ms(r, pre)
            if dec is not None:
                d = dataclasses.replace(dec, decode_max_kv=0.0)
                t = (ms(r, StepShape(shape.tokens, 0.0, 0.0, shape.seqs)) + t - ms(r, StepShape(pre.tokens, 0.0, 0.0, pre.seqs))
                     + ms(r, d) - ms(r, StepShape(d.tokens, 0.0, 0.0, d.seqs)) + cost.decode_tail_ms(dec, mode="tp", graph=graph))
            out["attention"] += t * layers
        else:
            out[op_class(r.kind)] += ms(r, rows) * layers
    out["attention"] += cost.graph_slots_ms(graph, dec, layers, tp=1, sp=1, mode="tp")
    for b in cost.graph.blocks:
        if b.tower == "text" and b.kind != "decoder":
            for r in cost._recs[b.name]:
                out[op_class(r.kind)] += ms(r, rows)
    bare = sum(coster.stage_ms(shape, "tp", dec))
    extra = coster.wait_ms(shape, "tp", dec)  # what a step not sent ahead adds
    return {"classes_ms": {k: round(v, 4) for k, v in out.items()}, "coster_ms": round(bare + extra, 4),
            "coster_without_extra_ms": round(bare, 4), "mixed_extra_ms": round(extra, 4),
            "tokens": shape.tokens, "graph_rows": rows.tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: the shapes' prices, no engine")
    ap.add_argument("--report", type=Path, default=ROOT / "bench/results/fidelity_2gpu.single.json")
    ap.add_argument("--model", default="llama")
    ap.add_argument("--case", default="single")
    ap.add_argument("--cases", default=";".join(f"{c},{d},{k}" for c, d, k in CASES),
                    help="C,D,K;...: a first chunk of C tokens beside D decodes of K keys")
    a = ap.parse_args(argv)
    try:
        cases = [tuple(int(x) for x in c.split(",")) for c in a.cases.split(";") if c]
        ok = cases and all(len(c) == 3 and 1 <= c[0] and 0 <= c[1] < 64 and c[0] + c[1] <= 2048
                           and (1 if c[1] else 0) <= c[2] <= 3000 for c in cases)
    except ValueError:
        ok = False
    if not ok:
        ap.error(f"--cases {a.cases!r}: C,D,K triples, ';'-separated: a chunk of C >= 1 tokens beside D decodes "
                 "(0-63, C + D <= 2,048) of K keys (1-3,000)")
    import torch

    import json

    from bench.common import command_line, driver_version, write_report
    from bench.step_fidelity import plan_of
    from costmodels.simulator import cost_model_for_plan, coster_for
    from graph.hf_config import load_config

    try:
        plan = plan_of(json.loads(a.report.read_text()), a.model, a.case)
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"--report {a.report} --model {a.model} --case {a.case}: no pinned plan there ({type(e).__name__}: {e})")
    cfg = load_config(preset=plan.model.preset)
    budget = max(c + d for c, d, _ in cases)
    if budget > plan.scheduler.max_batch_tokens or max(d for _, d, _ in cases) >= plan.scheduler.max_seqs:
        ap.error(f"--cases: the plan's steps hold {plan.scheduler.max_batch_tokens} tokens and {plan.scheduler.max_seqs} sequences")
    cost = cost_model_for_plan(plan)
    coster = coster_for(plan, cost, exact=True)  # no grid: the same composition the op sums below follow
    report: dict[str, Any] = {"command": command_line("bench/mixed_step_profile.py", argv), "torch": torch.__version__,
                              "python": platform.python_version(), "model": f"{plan.model.preset} shapes, "
                              f"{plan.model.weights_dtype}, random weights", "plan": f"{a.model} {a.case}",
                              "backend": plan.backend, "max_seqs": plan.scheduler.max_seqs,
                              "max_batch_tokens": plan.scheduler.max_batch_tokens,
                              "profile": cost.profile.id if cost.profile else None, "rows": []}
    eng = None
    if not a.tiny:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --tiny)")
        import os

        from bench.engine_gpu_check import hf_random
        from executors.engine import Engine
        from executors.weights import StateDictSource

        report.update(device=torch.cuda.get_device_name(), driver=driver_version(), cuda=torch.version.cuda,
                      pdl=os.environ.get("SHIFTPLAN_PDL", "1") != "0")
        hf = hf_random(cfg, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[plan.model.weights_dtype]), "cuda", 0)
        blocks = plan.scheduler.max_seqs * (max(k for _, _, k in cases) + budget + 16) // plan.scheduler.block_size + 256
        eng = Engine(plan, cfg, StateDictSource(dict(hf.state_dict())), device="cuda", kv_blocks=blocks,
                     backend=plan.backend, cuda_graphs=True, max_context=4096)  # graphs captured up to 4,096 keys
        del hf
        torch.cuda.empty_cache()
        eng.warm_up()
    for C, D, K in cases:
        row: dict[str, Any] = {"chunk": C, "decodes": D, "keys": K, "model": model_price(cost, coster, C, D, K)}
        if eng is not None:
            row.update(measure(eng, C, D, K))
        report["rows"].append(row)
        print(row, flush=True)
    if eng is not None:
        eng.shutdown()
    write_report(a.out, "mixed_step_profile", report, markdown(report), echo=True)
    return 0


def measure(eng: Any, C: int, D: int, K: int) -> dict[str, Any]:
    """One step of the shape through the engine's captured mixed graph: its replay's GPU ms (median of
    ``triton.testing.do_bench``) and its kernels by class."""
    import torch
    from triton.testing import do_bench

    from executors import Request
    from executors.graphs import kernel_table
    from executors.requests import make_seq
    from executors.scheduler import Scheduler, build_microbatch

    runner, a = eng.local, eng.args
    sch = eng.plan.scheduler
    graphs = runner.mixed_graphs
    sched = Scheduler(eng.num_blocks, sch.block_size, 1 << 20, sch.max_seqs)
    seqs = [make_seq(i, Request(tokens=[5 + i % 50] * K), a, 8, None, 1 << 30) for i in range(D)]
    for s in seqs:  # the decodes: their prompts taken as cached (their keys' values do not change the time)
        sched.add(s)
    if D:
        chunks, _ = sched.schedule()
        for c in chunks:
            c.seq.computed += c.n
            c.seq.tokens.append(7)
    sched.budget = C + D
    sched.add(make_seq(D, Request(tokens=[9] * C), a, 8, None, 1 << 30))
    chunks, _ = sched.schedule()
    mb = build_microbatch(chunks, "tp", sch.block_size, a.image_token_id)
    if sorted(c.n for c in chunks) != sorted([C] + [1] * D):
        raise SystemExit(f"case {C},{D},{K}: the scheduler formed chunks {sorted(c.n for c in chunks)}, not a chunk of "
                         f"{C} beside {D} decodes (too few KV blocks?)")
    with torch.inference_mode():
        graphs.run(mb, None)
        gr = graphs.graphs[graphs.last]
        replay = do_bench(gr.replay, warmup=20, rep=200, return_mode="median")
        kernels = kernel_table(gr.replay, top=60)
    by = dict.fromkeys(CLASSES, 0.0)
    for k in kernels:
        if "us_per_step" in k and k["calls_per_step"]:
            by[kernel_class(k["kernel"])] += k["us_per_step"] / 1e3
    return {"bucket": list(graphs.last[:3]), "replay_ms": round(replay, 4),
            "kernels_ms": {k: round(v, 4) for k, v in by.items()}, "kernels": kernels}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# A captured mixed step, kernel by kernel, beside the cost model ({r.get('device', 'no GPU: prices only')})", "",
             f"{r['model']}; plan `{r['plan']}` ({r['backend']} layers, max_seqs {r['max_seqs']}, step budget "
             f"{r['max_batch_tokens']}); driver "
             f"{r.get('driver', '-')}, torch {r['torch']}; programmatic dependent launch "
             f"{'on' if r.get('pdl', True) else 'off (kernel times add up)'}; profile `{r['profile']}`. "
             f"Command: `{r['command']}`.", "",
             "Per case: measured (kernels of the graph's replay by class, summed per step; the replay's GPU time) / "
             "the cost model's price (op by op, as the simulator's coster composes the step; its step price with "
             "and without the mixed-step extra), ms.", "",
             "| chunk C | decodes D x keys K | graph bucket | replay ms | coster ms (without extra) | "
             + " | ".join(CLASSES) + " |", "|---|---|---|---|---|" + "---|" * len(CLASSES)]
    for x in r["rows"]:
        m = x["model"]
        got = x.get("kernels_ms", {})
        cells = [f"{got[c]:.3f} / {m['classes_ms'][c]:.3f}" if got else f"- / {m['classes_ms'][c]:.3f}" for c in CLASSES]
        lines.append(f"| {x['chunk']} | {x['decodes']} x {x['keys']} | {x.get('bucket', '-')} | {x.get('replay_ms', '-')} | "
                     f"{m['coster_ms']} ({m['coster_without_extra_ms']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
