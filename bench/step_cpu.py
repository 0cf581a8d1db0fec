"""The CPU side of a decode step, piece by piece, at batch 1, 32 and 128 (no GPU needed).

A decode step on a GPU is a few milliseconds; what the host does around it is not overlapped
with the GPU, so it adds to every step. Timed here on this machine's CPU, per step (median of
rounds of ``reps``), for ``B`` sequences decoding at a context of 512 tokens (blocks of 16):

* ``schedule``: ``Scheduler.schedule`` (every running sequence gets its next token);
* ``build_microbatch``: the scheduled chunks packed into a ``MicroBatch``;
* ``pickle_round_trip``: the ``Step`` serialized and read back (what travels to spawned ranks);
* ``graph_inputs``: ``DecodeGraphs``' static input buffer filled (tokens, positions, slots, key
  counts, block table) before its copy to the GPU;

and the pickle round trip of a step carrying 32 images' pixels (what an image prefill step sends).

    python bench/step_cpu.py --out DIR
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK, CONTEXT = 16, 512


def _median_us(fn, reps: int, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return round(1e6 * statistics.median(times), 1)


def measure(B: int, reps: int) -> dict[str, float]:
    from executors.batch import Step
    from executors.graphs import DecodeGraphs
    from executors.scheduler import Scheduler, Seq, build_microbatch
    from executors.worker import from_bytes, to_bytes

    sc = Scheduler(1 << 20, BLOCK, 1 << 20, max(B, 1))
    for i in range(B):
        sc.add(Seq(req=i, tokens=list(range(CONTEXT)), prompt_len=CONTEXT, max_new=1 << 30))
    chunks, _ = sc.schedule()

    def advance() -> list:
        for c in chunks:
            c.seq.computed += c.n
            c.seq.tokens.append(1)
        return sc.schedule()[0]

    chunks = advance()
    mb = build_microbatch(chunks, "tp", BLOCK, None)
    assert mb.decode and mb.num_tokens == B
    out = {"schedule_us": _median_us(lambda: sc.schedule(), reps)}  # the same decodes again: blocks already held
    out["build_microbatch_us"] = _median_us(lambda: build_microbatch(chunks, "tp", BLOCK, None), reps)
    step = Step(1, [mb])
    out["pickle_round_trip_us"] = _median_us(lambda: from_bytes(to_bytes(step)), reps)
    out["step_bytes"] = len(to_bytes(step))

    stage = SimpleNamespace(  # what DecodeGraphs reads of a stage to fill its inputs (tiny static outputs)
        block_size=BLOCK, scratch_slot=0, par=SimpleNamespace(device=torch.device("cpu")), dtype=torch.float32,
        a=SimpleNamespace(mrope_section=None, hidden=1, vocab=1), model=SimpleNamespace(embed=object(), lm_head=object()))
    graphs = DecodeGraphs(stage, max(B, 1), CONTEXT + 1)
    b, keys = graphs.shape(mb)
    buf = torch.empty(graphs._size(b, keys), dtype=torch.long)
    out["graph_inputs_us"] = _median_us(lambda: graphs._pack(buf, mb, b, keys), reps)
    out["total_us"] = round(sum(v for k, v in out.items() if k.endswith("_us")), 1)
    return out


IMAGES, PATCHES, PATCH_DIM = 32, 1024, 3 * 2 * 14 * 14  # a Qwen2-VL step: 32 images of 448 x 448 px (32 x 32 patches)


def measure_images(reps: int) -> dict[str, float]:
    """The pickle round trip of a step carrying ``IMAGES`` images' pixels (bf16, as the driver sends
    them): the driver pickles it once, every rank of the replica unpickles it."""
    from executors.batch import ImageJob, Step
    from executors.worker import from_bytes, to_bytes

    g = torch.Generator().manual_seed(0)
    jobs = [ImageJob(i, torch.randn(PATCHES, PATCH_DIM, generator=g).to(torch.bfloat16), [(1, 32, 32)]) for i in range(IMAGES)]
    step = Step(1, [], images=jobs)
    wire = to_bytes(step)
    return {"images": IMAGES, "bytes": len(wire),
            "pickle_ms": round(_median_us(lambda: to_bytes(step), reps) / 1e3, 2),
            "unpickle_ms": round(_median_us(lambda: from_bytes(wire), reps) / 1e3, 2)}


def main() -> None:
    from bench.common import write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    rows = {f"batch_{B}": measure(B, args.reps) for B in (int(x) for x in args.batches.split(","))}
    img = measure_images(max(1, args.reps // 10))
    r = {"command": "python bench/step_cpu.py --out DIR", "cpu": platform.processor() or platform.machine(),
         "python": platform.python_version(), "torch": torch.__version__, "context": CONTEXT, "block": BLOCK,
         "batches": rows, "image_step": img}
    lines = [f"# CPU side of a decode step: {r['cpu']}, Python {r['python']}, torch {r['torch']}", "",
             f"Command: `{r['command']}`. Microseconds per step (median of 5 rounds), context {CONTEXT} tokens.", "",
             "| batch | schedule | build micro-batch | pickle round trip (spawned ranks) | graph inputs | total |",
             "|---|---|---|---|---|---|"]
    for k, x in rows.items():
        lines.append(f"| {k[6:]} | {x['schedule_us']} | {x['build_microbatch_us']} | {x['pickle_round_trip_us']} "
                     f"({x['step_bytes']} B) | {x['graph_inputs_us']} | {x['total_us']} |")
    lines += ["", f"A step carrying {img['images']} images' pixels ({img['bytes'] / 1e6:.1f} MB of bf16, Qwen2-VL at "
              f"448 x 448 px): pickled by the driver in {img['pickle_ms']} ms, unpickled by each rank in "
              f"{img['unpickle_ms']} ms (medians of 5 rounds)."]
    write_report(args.out, "step_cpu", r, "\n".join(lines) + "\n", echo=True)


if __name__ == "__main__":
    main()
