"""Engine speed beside the hardware floor and beside HF transformers, measured in one run.

Llama-3.1-8B shapes (the preset's config), bf16, random weights drawn once into the HF model; the
engine reads the very same tensors. First the two ceilings of this GPU are measured:

* copy bandwidth ``BW``: a device-to-device copy of 4 GiB, bytes read + written over its time;
* matmul rate ``R``: an 8192 x 8192 x 8192 bf16 product on random data.

Then, for each engine variant (eager; + CUDA graphs for decode; + torch.compile of the layers; + the
single-rank look-ahead, which queues each step before reading the last one's tokens):

* decode at batch B (1, 32, 128; 512-token prompts, 128 new tokens): TPOT p50 and decode
  throughput ``B / TPOT``, beside the floor ``(weight bytes read per step + KV bytes read per step)
  / BW`` (weights: every decoder and lm_head matrix once; KV: each sequence's keys and values at the
  mean context);
* prefill of one 8,192-token prompt: TTFT, and its FLOPs (``2 x linear params x T`` plus causal
  attention ``2 x layers x T^2 x heads x head_dim``) over TTFT as a fraction of ``R``;
* HF transformers eager ``generate`` on the same shapes (batch 1 and 32): TPOT from the time of
  ``N`` tokens minus the time of 1, over ``N - 1``.

    python bench/engine_speed.py --out DIR                 # one GPU; with 2+ GPUs also points 2-3
    python bench/engine_speed.py --out DIR --tiny          # CPU dry run, tiny config

Writes DIR/engine_speed.json and DIR/engine_speed.md. With two or more GPUs visible (or
``--multi-gpu on``) the same call then runs the multi-GPU points in fresh processes: each parallel
mode against one GPU (``bench/mesh_speed.py``) and Qwen2-VL with images, the vision tower per
placement (``bench/vl_speed.py``), into the same folder; ``engine_speed.json`` names their files.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (backend, CUDA graphs, look-ahead: the next step queued before the last one's tokens are read)
VARIANTS = {"eager": ("eager", False, False), "graphs": ("eager", True, False),
            "graphs+compile": ("compile", True, False), "graphs+compile+lookahead": ("compile", True, True)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ceilings(device: str) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s), medians of 10."""
    if not device.startswith("cuda"):
        return {"copy_GBps": float("nan"), "matmul_TFLOPs": float("nan")}
    from triton.testing import do_bench

    src = torch.empty(1 << 31, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    bw = 2 * src.numel() * 2 / (ms / 1e3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_GBps": round(bw, 1), "matmul_TFLOPs": round(2 * n**3 / (ms / 1e3) / 1e12, 1)}


def model_figures(a: Any) -> dict[str, float]:
    """Bytes a decode step reads (weights, KV per token) and FLOP counts of the model."""
    H, D, I, L = a.hidden, a.head_dim, a.intermediate, a.layers
    per_layer = H * (a.heads + 2 * a.kv_heads) * D + a.heads * D * H + 3 * H * I + 2 * H
    linear = L * per_layer + a.vocab * H + H  # decoder layers + lm_head + final norm
    return {"weight_bytes_per_step": 2 * linear, "kv_bytes_per_token": 2 * 2 * L * a.kv_heads * D,
            "linear_params": L * (per_layer - 2 * H), "layers": L, "heads": a.heads, "head_dim": D}


def plan_for(cfg: dict, max_seqs: int, max_tokens: int) -> Any:
    from bench.engine_gpu_check import build_plan

    p = build_plan("llama-3.1-8b", cfg, "bf16")
    return p.model_copy(update={"scheduler": p.scheduler.model_copy(
        update={"max_seqs": max_seqs, "max_batch_tokens": max_tokens})}).check()


def run_batch(eng: Any, B: int, prompt: int, new: int, vocab: int, seed: int, device: str) -> dict[str, float]:
    """All B requests at t=0. Per request: TTFT, TPOT (mean gap after its first token). Per engine
    step (tokens yielded under one step id): the decode step time, the median gap between two
    consecutive steps that each gave all B requests a token (pure decode at batch B)."""
    from executors import Request, Sampling

    g = torch.Generator().manual_seed(seed)
    reqs = [Request(tokens=torch.randint(10, min(vocab, 100_000), (prompt,), generator=g).tolist()) for _ in range(B)]
    eng.generate(reqs[: min(B, 2)], max_new_tokens=3, sampling=Sampling(stop_on_eos=False))  # warm-up
    sync(device)
    times: dict[int, list[float]] = {i: [] for i in range(B)}
    steps: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    for i, tok, _r in eng.stream(reqs, max_new_tokens=new, sampling=Sampling(stop_on_eos=False)):
        if tok is not None:
            now = time.perf_counter() - t0
            times[i].append(now)
            steps.setdefault(eng.step_id, []).append(now)
    wall = time.perf_counter() - t0
    ttft = sorted(t[0] for t in times.values())
    tpot = sorted((t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1)
    ids = sorted(steps)
    full = [k for k in ids if len(steps[k]) == B]
    gaps = sorted(steps[b][0] - steps[a][0] for a, b in zip(full, full[1:]) if b == a + 1)
    med = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    out = {"ttft_ms_p50": round(1e3 * med(ttft), 3), "tpot_ms_p50": round(1e3 * med(tpot), 3),
           "decode_step_ms": round(1e3 * med(gaps), 3), "decode_steps_timed": len(gaps),
           "output_tok_s": round(B * new / wall, 1), "decode_tok_s": round(B / med(gaps), 1) if gaps else float("nan")}
    runner = getattr(eng, "local", None)
    if device.startswith("cuda") and runner is not None and runner.graphs is not None:
        from triton.testing import do_bench

        from executors.graphs import bucket, kernel_table

        last = runner.graphs.last  # (B, L, mode) of the last decode step: the static inputs hold its inputs
        if last is not None and last[0] == bucket(B, runner.graphs.sizes):  # GPU time of the step alone, replayed
            gr = runner.graphs.graphs[last]
            out["graph_replay_ms"] = round(do_bench(gr.replay, warmup=20, rep=200, return_mode="median"), 3)
            out["graph_kernels"] = kernel_table(gr.replay)
    return out


def hf_generate(hf: Any, B: int, prompt: int, new: int, vocab: int, seed: int, device: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(vocab, 100_000), (B, prompt), generator=g).to(device)

    def timed(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t

    timed(2)  # warm-up
    t1, tn = timed(1), timed(new)
    tpot = (tn - t1) / (new - 1)
    return {"ttft_ms": round(1e3 * t1, 3), "tpot_ms": round(1e3 * tpot, 3), "output_tok_s": round(B * new / tn, 1),
            "decode_tok_s": round(B / tpot, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny test config")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--hf-batches", default="1,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multi-gpu", choices=("auto", "on", "off"), default="auto",
                    help="also run bench/mesh_speed.py and bench/vl_speed.py (auto: when 2+ GPUs are visible)")
    args = ap.parse_args()
    from bench.engine_gpu_check import hf_random
    from bench.common import command_line, driver_version, write_report
    from executors.config import model_args
    from executors.engine import Engine
    from executors.weights import StateDictSource
    from graph.hf_config import load_config

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny.helpers import config as tiny_config

        cfg = tiny_config("llama")
        args.prompt, args.new, args.prefill, args.batches = 16, 8, 64, "1,4"
    else:
        cfg = load_config(preset="llama-3.1-8b")
    import transformers

    a = model_args(cfg)
    fig = model_figures(a)
    report: dict[str, Any] = {
        "command": command_line("bench/engine_speed.py", None),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "driver": driver_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "model": "llama-3.1-8b shapes, bf16, random weights", "prompt_tokens": args.prompt, "new_tokens": args.new,
        "ceilings": ceilings(device), "model_figures": fig, "variants": {}, "hf": {},
    }
    bw = report["ceilings"]["copy_GBps"] * 1e9
    rate = report["ceilings"]["matmul_TFLOPs"] * 1e12
    print(json.dumps(report["ceilings"]), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    hf = hf_random(cfg, torch.bfloat16, device, args.seed)
    ctx = args.prompt + args.new / 2  # mean context over the decode
    # a step budget that holds every prompt of the largest batch: all B requests are prefilled in one
    # step and decode together to the end, so the last step (whose inputs the graphs' static buffer
    # holds: ``run_batch`` replays it) is a full batch-B step
    plan = plan_for(cfg, max(batches), max(args.prefill, 8192 if not args.tiny else 64, max(batches) * args.prompt))
    blocks = -(-max(batches) * (args.prompt + args.new) // plan.scheduler.block_size) + 64
    blocks = max(blocks, -(-args.prefill // plan.scheduler.block_size) + 64)

    def save() -> None:
        write_report(args.out, "engine_speed", report, markdown(report))

    for name in args.variants.split(","):
        backend, graphs, lookahead = VARIANTS[name]
        res: dict[str, Any] = {}
        report["variants"][name] = res
        try:
            t = time.perf_counter()
            eng = Engine(plan, cfg, StateDictSource(dict(hf.state_dict())), device=device, kv_blocks=blocks,
                         backend=backend, cuda_graphs=graphs, lookahead=lookahead)
            res["load_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            eng.warm_up()  # as ``executors.load`` does: compiled shapes, every step graph captured
            res["warm_up_s"] = round(time.perf_counter() - t, 2)
            res["graphs_after_warm_up"] = eng.graph_captures()
            for B in batches:
                r = run_batch(eng, B, args.prompt, args.new, a.vocab, args.seed, device)
                floor_ms = 1e3 * (fig["weight_bytes_per_step"] + B * ctx * fig["kv_bytes_per_token"]) / bw
                r.update(floor_ms=round(floor_ms, 3), step_over_floor=round(r["decode_step_ms"] / floor_ms, 2))
                res[f"batch_{B}"] = r
                print(name, B, json.dumps(r), flush=True)
                save()
            r = run_batch(eng, 1, args.prefill, 1, a.vocab, args.seed + 1, device)
            T = args.prefill
            flops = 2 * fig["linear_params"] * T + 2 * fig["layers"] * T * T * fig["heads"] * fig["head_dim"]
            res["prefill"] = {"tokens": T, "ttft_ms": r["ttft_ms_p50"], "tflop": round(flops / 1e12, 2),
                              "tflops_achieved": round(flops / (r["ttft_ms_p50"] / 1e3) / 1e12, 1),
                              "fraction_of_matmul_rate": round(flops / (r["ttft_ms_p50"] / 1e3) / rate, 3),
                              "floor_ms": round(1e3 * flops / rate, 2)}
            print(name, "prefill", json.dumps(res["prefill"]), flush=True)
            res["graphs_at_end"] = eng.graph_captures()  # beside graphs_after_warm_up: none captured while measuring
            eng.shutdown()
            del eng
        except Exception as e:  # record and go on: a failed variant must not lose the others
            import traceback

            res["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    for B in [int(b) for b in args.hf_batches.split(",") if b]:
        if args.tiny and B > 4:
            continue
        report["hf"][f"batch_{B}"] = hf_generate(hf, B, args.prompt, args.new, a.vocab, args.seed, device)
        print("hf", B, json.dumps(report["hf"][f"batch_{B}"]), flush=True)
        save()
    with torch.no_grad():
        ids = torch.randint(10, min(a.vocab, 1000), (1, args.prefill), device=device)
        hf(input_ids=ids[:, :16])
        sync(device)
        t = time.perf_counter()
        hf(input_ids=ids, logits_to_keep=1)
        sync(device)
        report["hf"]["prefill_ttft_ms"] = round(1e3 * (time.perf_counter() - t), 3)
    save()
    print(markdown(report))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.multi_gpu == "on" or (args.multi_gpu == "auto" and gpus >= 2 and not args.tiny):
        report["multi_gpu"] = run_multi_gpu(args.out, args.tiny)
        save()


def run_multi_gpu(out: Path, tiny: bool) -> dict[str, Any]:
    """Points 2-3 of the engine's speed, each script in a process of its own (GPU memory freed
    between them): exit code and results file per script."""
    done = {}
    for script in ("mesh_speed", "vl_speed"):
        cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--out", str(out)] + (["--tiny"] if tiny else [])
        rc = subprocess.run(cmd).returncode
        done[script] = {"returncode": rc, "results": f"{script}.md" if (out / f"{script}.md").exists() else None}
    return done


def markdown(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    lines = [f"# Engine speed: {r['model']}", "",
             f"Device {r['device']}, driver {r['driver']}, torch {r['torch']} (CUDA {r['cuda']}), transformers "
             f"{r['transformers']}, Python {r['python']}. Command: `{r['command']}`.", "",
             f"Measured ceilings: copy {c['copy_GBps']} GB/s (read + write), bf16 matmul {c['matmul_TFLOPs']} TFLOP/s. "
             f"Decode floor = (weights {r['model_figures']['weight_bytes_per_step'] / 1e9:.2f} GB + KV at the mean "
             f"context) / copy bandwidth. Prompts of {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens.", "",
             "Decode: the step time of pure decode steps at batch B (median gap between consecutive steps that each "
             "gave all B requests a token; GPU time of the step's graph replay beside it), against HF eager "
             "`generate`'s TPOT ((time of N tokens - time of 1) / (N - 1)) on the same shapes.", "",
             "| variant | case | measured | GPU (graph replay) | floor | x floor | HF eager | x faster than HF |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | error | {v['error'][:80]} | | | | |")
        for k, x in v.items():
            if not k.startswith("batch_") or not isinstance(x, dict):
                continue
            hf = r["hf"].get(k, {})
            hf_s = f"{hf['tpot_ms']} ms" if hf else "-"
            speed = f"{hf['tpot_ms'] / x['decode_step_ms']:.2f}x" if hf else "-"
            gpu = f"{x['graph_replay_ms']} ms" if "graph_replay_ms" in x else "-"
            lines.append(f"| {name} | decode {k.replace('_', ' ')}: step ({x['decode_tok_s']} tok/s; TPOT p50 "
                         f"{x['tpot_ms_p50']} ms) | {x['decode_step_ms']} ms | {gpu} | {x['floor_ms']} ms | "
                         f"{x['step_over_floor']} | {hf_s} | {speed} |")
        p = v.get("prefill")
        if p:
            hf_p = r["hf"].get("prefill_ttft_ms")
            hf_s, speed = (f"{hf_p} ms", f"{hf_p / p['ttft_ms']:.2f}x") if hf_p else ("-", "-")
            lines.append(f"| {name} | prefill {p['tokens']} tokens: TTFT ({p['tflops_achieved']} TFLOP/s, "
                         f"{100 * p['fraction_of_matmul_rate']:.0f}% of matmul rate) | {p['ttft_ms']} ms | - | {p['floor_ms']} ms | "
                         f"{p['ttft_ms'] / p['floor_ms']:.2f} | {hf_s} | {speed} |")
    for script, m in r.get("multi_gpu", {}).items():
        lines += ["", f"Multi-GPU, same call: `{script}.py` exited {m['returncode']}; results in "
                      f"`{m['results'] or 'none written'}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
