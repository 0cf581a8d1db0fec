"""A captured mixed step's attention per layer: its decodes in the paged prefill kernel (with the
prefill chunks) against the paged decode kernel (``executors.graphs.GRAPH_DECODES``).

A prefill or mixed step the engine replays as a CUDA graph (``executors.graphs.MixedGraphs``) attends
its prefill chunks with the paged prefill kernel over a fixed grid. Its decodes (sequences of one
query row) either take a program of that kernel each (``BLOCK_M = 16`` query rows, one of them
real), or go to the paged decode kernel, launched over the graph's ``S + 1`` sequence slots with key
count 0 on every slot that is not a decode, and write their rows of the same output
(``paged_prefill.attend``). This script times one layer's attention both ways, as a graph runs it:
the step's token bucket, ``S = 256`` sequence slots (the plans' ``max_seqs``), the key bucket of the
longest context, 16-key blocks; one first chunk of ``--chunk`` tokens beside ``D`` decodes of ``C``
keys each. GPU time of one call with a cold L2 (``bench.common.graphed_us``), bf16, random data; the
largest difference between the two outputs (the same attention, summed in another order).
Head shapes: Llama-3.1-8B's (32 query heads over 8 KV heads) and Qwen2-VL-7B's (28 over 4), head dim
128, on one GPU. A case with no decodes is the decode launch's cost where it has nothing to do.

    python bench/graph_decodes.py --out DIR                       # on a CUDA machine (~1 min)
    TRITON_INTERPRET=1 python bench/graph_decodes.py --out DIR --tiny   # CPU dry run (small shapes)

Writes DIR/graph_decodes.json and DIR/graph_decodes.md.

``--price REPORT`` adds the cost model's price of each measured case to a report (any machine): one
decoder layer's attention of the model preset on one H200 (the h200 profile), the prefill chunk from
the paged prefill kernel's table, the decodes from the decode kernel's (``attn_decode_engine``) plus
their longest range's tail, and the decode kernel's programs on the graph's empty slots
(``CostModel.graph_slots_ms``). The tail is priced twice: with the keys cut as the step graph cuts
them (``CostModel.step_graph``, ``plans.engine_shapes.graph_splits``: the model's) and as a decode step
of the same decodes would (``splits``); each beside the decode kernel's measured time:

    python bench/graph_decodes.py --out DIR --price bench/results/graph_decodes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = {"llama-3.1-8b": (32, 8, 128), "qwen2-vl-7b": (28, 4, 128)}
DECODES = ((0, 0), (2, 1500), (8, 1500), (8, 4000), (32, 500), (32, 1500), (32, 4000), (128, 500), (128, 1500), (128, 4000))
PATHS = ("prefill_kernel", "decode_kernel")


def step_inputs(chunk: int, decodes: int, ctx: int, slots: int, block: int, decode_kernel: bool,
                device: torch.device) -> tuple[Any, int, int]:
    """``(PrefillInputs, T, cache slots)`` of a captured step (int64, as ``MixedGraphs._pack`` lays them
    out): sequence 0 a first chunk of ``chunk`` tokens, then ``decodes`` sequences of one query after
    ``ctx - 1`` cached keys; ``slots`` sequence slots plus the empty one; each sequence's blocks in turn."""
    from executors import paged_prefill
    from executors.graphs import TOKEN_BUCKETS, bucket
    from plans.engine_shapes import keys_bucket

    nq = [chunk] + [1] * decodes
    ctx_of = [chunk] + [ctx] * decodes
    T = bucket(sum(nq), TOKEN_BUCKETS)
    width = keys_bucket(max(ctx_of)) // block
    S = slots
    t0 = [sum(nq[:i]) for i in range(len(nq))]
    table, nxt = torch.zeros(S + 1, width, dtype=torch.long), 0
    for i, c in enumerate(ctx_of):
        used = -(-c // block)
        table[i, :used] = torch.arange(nxt, nxt + used)
        nxt += used
    pad = lambda xs: torch.tensor(xs + [0] * (S + 1 - len(xs)))  # noqa: E731
    seq_of, row0 = paged_prefill.program_rows(torch.tensor(nq), torch.tensor(t0), T // paged_prefill.BLOCK_M + S, S,
                                              decodes=not decode_kernel)
    pre = paged_prefill.PrefillInputs(*(x.to(device) for x in (table, pad(t0), pad(nq), pad(ctx_of), seq_of, row0)),
                                      block)
    return (pre.decode_inputs(T) if decode_kernel else pre), T, nxt * block


def price_row(row: dict[str, Any], chunk: int, slots: int) -> dict[str, float]:
    """The cost model's us for one row's layer of attention (module doc): ``model_us`` with the decodes'
    keys cut as the step graph cuts them, ``decode_cut_us`` as a decode step would."""
    import dataclasses

    from costmodels.opcost import op_time
    from graph.opgraph import StepShape

    cm = _cost_model(row["model"])
    attn = cm._decode_attention
    D, C = row["decodes"], row["context"]
    mixed, dec = StepShape.from_sequences([chunk] + [1] * D, [chunk] + [C] * D) if D else (StepShape.prefill([chunk]), None)
    pre = mixed if dec is None else StepShape(mixed.tokens - dec.tokens, mixed.pairs - dec.pairs, mixed.kv - dec.kv,
                                             mixed.seqs - dec.seqs)

    def ms(shape: StepShape) -> float:
        c, m, o = op_time(attn, shape, 1, 1, cm.rates, cm.profile, True)
        return max(c, m) + o

    graph = cm.step_graph(mixed, dec, sp=1, mode="tp", max_seqs=slots)
    assert graph is not None, "a step of these tokens is captured on this profile"
    base = ms(pre) + cm.graph_slots_ms(graph, dec, 1, tp=1, sp=1, mode="tp")
    if dec is None:
        return {"model_us": round(base * 1e3, 2), "decode_cut_us": round(base * 1e3, 2)}
    base += ms(dataclasses.replace(dec, decode_max_kv=0.0))
    return {"model_us": round((base + cm.decode_tail_ms(dec, graph=graph, mode="tp")) * 1e3, 2),
            "decode_cut_us": round((base + cm.decode_tail_ms(dec, mode="tp")) * 1e3, 2)}


def _cost_model(preset: str) -> Any:
    """The cost model of ``preset`` on one H200 (bf16, compiled layers, this engine)."""
    from bench.common import spec_for
    from planner.inputs import cost_model_of

    return cost_model_of(spec_for(f"{preset}-graph-decodes", None, preset, 1, "bf16"))[0]


def price(report: dict[str, Any]) -> None:
    """``model_us`` and ``decode_cut_us`` (``price_row``) and their ratios to the measured decode
    kernel's time on every row of ``report``."""
    for row in report["rows"]:
        row.update(price_row(row, report["chunk"], report["slots"]))
        for k in ("model_us", "decode_cut_us"):
            row[k.replace("_us", "_over_kernel")] = round(row[k] / row["decode_kernel_us"], 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run, small shapes (with TRITON_INTERPRET=1)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--fill", default="", help="comma-separated engine_shapes.GRAPH_FILL_SEQS values to time the "
                    "decode kernel at too (the decodes its key ranges fill the GPU for)")
    ap.add_argument("--price", type=Path, default=None, metavar="REPORT",
                    help="add the cost model's price to a measured report (no GPU)")
    a = ap.parse_args(argv)
    if a.price is not None:
        from bench.common import price_report

        return price_report(ap, a.price, "graph_decodes", price, markdown, a.out, argv)
    try:
        fills = [int(x) for x in a.fill.split(",") if x]
    except ValueError:
        fills = [0]
    bad = ([f"--chunk {a.chunk}: at least 2 tokens"] if a.chunk < 2 else []) \
        + ([f"--slots {a.slots}: at least 1"] if a.slots < 1 else []) \
        + ([f"--fill {a.fill!r}: whole numbers of at least 1, comma-separated"] if min(fills, default=1) < 1 else [])
    if bad:
        ap.error("; ".join(bad))
    from bench.common import command_line, driver_version, graphed_us, write_report
    from executors import paged_prefill
    from plans import engine_shapes

    dev = torch.device("cpu" if a.tiny else "cuda")
    heads = {"tiny": (8, 2, 16)} if a.tiny else HEADS
    cases = ((0, 0), (3, 40)) if a.tiny else DECODES
    chunk, slots = (12, 8) if a.tiny else (a.chunk, a.slots)
    block, dtype = 16, (torch.float32 if a.tiny else torch.bfloat16)
    report: dict[str, Any] = {
        "command": command_line("bench/graph_decodes.py", argv),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu"),
        "driver": driver_version(), "torch": torch.__version__, "python": platform.python_version(),
        "dtype": str(dtype).split(".")[-1],
        "chunk": chunk, "slots": slots, "block": block, "fill": engine_shapes.GRAPH_FILL_SEQS, "rows": []}
    g = torch.Generator(device=dev).manual_seed(0)
    for model, (hq, hkv, D) in heads.items():
        for decodes, ctx in cases:
            row: dict[str, Any] = {"model": model, "heads": [hq, hkv, D], "decodes": decodes, "context": ctx}
            inputs = [step_inputs(chunk, decodes, ctx, slots, block, path == "decode_kernel", dev) for path in PATHS]
            T, used = inputs[0][1:]
            q, k, v = (torch.randn(n, h, D, generator=g, device=dev).to(dtype)
                       for n, h in ((T, hq), (used + 1, hkv), (used + 1, hkv)))
            outs = []
            for path, (pre, _, _) in zip(PATHS, inputs):
                fn = lambda: paged_prefill.attend(q, k, v, pre)  # noqa: E731
                outs.append(fn().float())
                row[path + "_us"] = round(graphed_us(fn), 2) if dev.type == "cuda" else None
            fill = engine_shapes.GRAPH_FILL_SEQS
            for n in fills:  # the decode kernel's ranges cut for n decodes
                engine_shapes.GRAPH_FILL_SEQS = n
                row[f"decode_kernel_fill{n}_us"] = round(graphed_us(fn), 2) if dev.type == "cuda" else None
            engine_shapes.GRAPH_FILL_SEQS = fill
            row["tokens"] = T
            row["max_abs_diff"] = float(f"{float((outs[0] - outs[1]).abs().max()):.3g}")
            if row["prefill_kernel_us"]:
                row["ratio"] = round(row["decode_kernel_us"] / row["prefill_kernel_us"], 3)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    write_report(a.out, "graph_decodes", report, markdown(report), echo=True)
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# A captured mixed step's decodes: paged prefill kernel vs paged decode kernel ({r['device']})", "",
             f"driver {r.get('driver', '-')}, torch {r['torch']}, {r['dtype']}, one layer's attention: a first chunk of {r['chunk']} tokens beside "
             f"D decodes of C keys, {r['slots']} sequence slots, blocks of {r['block']} keys; GPU us of one call, "
             f"cold L2; the decode kernel's key ranges as a graph cuts them (``engine_shapes.graph_splits``: one where "
             f"the key bucket fits one, else as for {r['fill']} decodes). "
             f"Command: `{r['command']}`.", ""]
    sweep = [k for k in r["rows"][0] if k.startswith("decode_kernel_fill")] if r["rows"] else []
    priced = bool(r["rows"]) and "model_us" in r["rows"][0]
    if priced:
        lines += [f"Model: the cost model's price of the same layer (`{r['priced']}`), the decodes' longest range cut "
                  "as the step graph cuts the keys (the model's) and as a decode step of them would; each over the "
                  "decode kernel's time.", ""]
    cols = ["model us / over kernel", "decode-step cut us / over kernel"] if priced else []
    lines += ["| model (heads / KV heads) | D decodes | C keys | step tokens (bucket) | decodes in the prefill kernel, us "
              "| in the decode kernel, us | ratio | max abs diff |"
              + "".join(f" ranges for {k[18:-3]} decodes, us |" for k in sweep) + "".join(f" {c} |" for c in cols),
              "|---|---|---|---|---|---|---|---|" + "---|" * (len(sweep) + len(cols))]
    for x in r["rows"]:
        lines.append(f"| {x['model']} ({x['heads'][0]} / {x['heads'][1]}) | {x['decodes']} | {x['context']} | "
                     f"{x['tokens']} | {x['prefill_kernel_us']} | {x['decode_kernel_us']} | {x.get('ratio', '-')} | "
                     f"{x['max_abs_diff']} |" + "".join(f" {x[k]} |" for k in sweep)
                     + (f" {x['model_us']} / {x['model_over_kernel']} | {x['decode_cut_us']} / {x['decode_cut_over_kernel']} |"
                        if priced else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
