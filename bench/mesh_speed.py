"""Each parallel mode on several GPUs against one GPU, measured in one run (issue 12, point 2).

Llama-3.1-8B shapes (``--model qwen2-vl-7b``: Qwen2-VL-7B's language model on text prompts), bf16,
random weights saved once as a safetensors checkpoint that every rank reads its slices of. For each mesh (single, tp2, sp2, shift(sp2), pp2, dp2 on two GPUs):

* decode step time at batch 1 (512-token prompt, 128 new tokens; pure decode steps, see
  ``engine_speed.run_batch``);
* TTFT of one 8,192-token prompt;
* output throughput of 64 concurrent requests (1,024-token prompts, 64 new tokens), after an
  untimed run of the same batch with 4 new tokens (its step shapes compiled, its graphs captured);
* the first 16 greedy tokens of one prompt (``tp2-nccl`` must give ``tp2``'s: with two ranks
  NCCL's and the one-shot kernel's sums are both ``a + b``).

Each figure is reported as a ratio to the single-GPU run of the same script. Decode steps replay
CUDA graphs (collectives captured in them); the layers are compiled (``--backend eager`` to launch
every op from Python; eager with ``--tiny``).

    python bench/mesh_speed.py --out DIR              # on a machine with 2 GPUs
    python bench/mesh_speed.py --out DIR --model qwen2-vl-7b --meshes single,tp2
    python bench/mesh_speed.py --out DIR --tiny       # CPU dry run (gloo ranks, tiny config)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MESHES: dict[str, dict[str, Any]] = {
    "single": {}, "tp2": {"tp": 2}, "sp2": {"sp": 2}, "shift-sp2": {"sp": 2, "shift": 256},
    "pp2": {"pp": 2, "microbatches": 2}, "dp2": {"dp": 2},
    # tp2 with every all-reduce through NCCL (executors.load(..., all_reduce="nccl")): the one-shot
    # kernel's gain, and its sums checked (same greedy tokens as tp2: a + b has one rounding)
    "tp2-nccl": {"tp": 2, "all_reduce": "nccl", "same_as": "tp2"},
}


def mesh_plan(cfg: dict, name: str, gpus: int, max_seqs: int, max_tokens: int, preset: str = "llama-3.1-8b") -> Any:
    from bench.engine_gpu_check import build_plan
    from plans.mesh import even_layers
    from plans.schema import Hardware, Mesh, Shift, Stage

    m = MESHES[name]
    base = build_plan(preset, cfg, "bf16")
    L, pp = base.model.num_layers, m.get("pp", 1)
    stages = [Stage(index=i, first_layer=a, last_layer=b, embedding=i == 0, lm_head=i == pp - 1,
                    vision=i == 0 and base.stages[0].vision)  # the VL model's tower on stage 0 (stage0_dp)
              for i, (a, b) in enumerate(even_layers(L, pp))]
    shift = Shift(enabled="shift" in m, threshold_tokens=m.get("shift"))
    sched = base.scheduler.model_copy(update={"max_seqs": max_seqs, "max_batch_tokens": max_tokens,
                                              "microbatches": m.get("microbatches", 1)})
    return base.model_copy(update={
        "name": f"mesh-speed-{name}", "mesh": Mesh(dp=m.get("dp", 1), pp=pp, tp=m.get("tp", 1), sp=m.get("sp", 1)),
        "stages": stages, "shift": shift, "scheduler": sched,
        "hardware": Hardware(gpu=base.hardware.gpu, gpus_per_node=gpus, nodes=1)}).check()


def measure(plan: Any, cfg: dict, ckpt: Path, device: str, backend: str, graphs: bool, tiny: bool,
            all_reduce: str = "auto", lookahead: bool = True) -> dict[str, Any]:
    import executors
    from bench.engine_speed import run_batch
    from executors.config import model_args

    a = model_args(cfg)
    p, n, long, conc, cp, cn = (512, 128, 8192, 64, 1024, 64) if not tiny else (16, 8, 64, 4, 16, 4)
    blocks = -(-(conc * (cp + cn) + long) // plan.scheduler.block_size) + 64
    t = time.perf_counter()
    prof_dir = Path(tempfile.mkdtemp(prefix="graph-profile-"))  # spawned ranks profile their decode graph at shutdown
    os.environ["SHIFTPLAN_GRAPH_PROFILE"] = str(prof_dir)
    with executors.load(plan, weights=ckpt, device=device, backend=backend, kv_blocks=blocks, cuda_graphs=graphs,
                        config=cfg, lookahead=lookahead, all_reduce=all_reduce) as eng:
        out: dict[str, Any] = {"load_s": round(time.perf_counter() - t, 1)}
        out["decode_b1"] = run_batch(eng, 1, p, n, a.vocab, 0, device)
        out["prefill"] = run_batch(eng, 1, long, 1, a.vocab, 1, device)
        run_batch(eng, conc, cp, 4, a.vocab, 3, device)  # warm-up: this batch's step shapes compiled, graphs captured
        out["concurrent"] = run_batch(eng, conc, cp, cn, a.vocab, 2, device)
        out["modes"] = dict(eng.mode_counts)
        prompt = torch.randint(10, min(a.vocab, 100_000), (64,), generator=torch.Generator().manual_seed(3)).tolist()
        out["greedy_tokens"] = eng.generate([executors.Request(tokens=prompt)], max_new_tokens=16,
                                            sampling=executors.Sampling(temperature=0.0, stop_on_eos=False))[0].tokens
    os.environ.pop("SHIFTPLAN_GRAPH_PROFILE")
    if (prof_dir / "rank0.json").exists():  # rank 0's smallest decode graph: replay time and kernels
        out["graph_profile"] = json.loads((prof_dir / "rank0.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--meshes", default=",".join(MESHES))
    ap.add_argument("--model", default="llama-3.1-8b", choices=("llama-3.1-8b", "qwen2-vl-7b"),
                    help="the preset (a vision-language model runs text prompts: its language model)")
    ap.add_argument("--backend", default=None, help="layers: compile (default on GPUs) or eager (default with --tiny)")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="engines read each step's tokens before queueing the next (the look-ahead is on by default)")
    args = ap.parse_args()
    from bench.common import driver_version, write_report
    from bench.engine_gpu_check import hf_random
    from graph.hf_config import load_config

    device = "cpu" if args.tiny else "cuda"
    args.backend = args.backend or ("eager" if args.tiny else "compile")
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny.helpers import config as tiny_config

        cfg = tiny_config("llama" if args.model.startswith("llama") else "qwen2_vl")
    else:
        cfg = load_config(preset=args.model)
    gpus = 2 if args.tiny else torch.cuda.device_count()
    import transformers

    report: dict[str, Any] = {
        "command": "python bench/mesh_speed.py --out DIR" + (" --tiny" if args.tiny else "")
                   + (f" --backend {args.backend}" if args.backend != ("eager" if args.tiny else "compile") else "")
                   + (" --no-lookahead" if not args.lookahead else "") + (f" --meshes {args.meshes}" if args.meshes != ",".join(MESHES) else "")
                   + (f" --model {args.model}" if args.model != "llama-3.1-8b" else ""),
        "device": f"{gpus} x " + (torch.cuda.get_device_name() if device == "cuda" else "cpu"),
        "driver": driver_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": f"{args.model} shapes{' (text prompts)' if 'vl' in args.model else ''}, bf16, random weights", "backend": args.backend, "lookahead": args.lookahead,
        "meshes": {},
    }
    ckpt = Path(tempfile.mkdtemp(prefix="mesh-speed-"))
    hf = hf_random(cfg, torch.bfloat16, device, 0)
    hf.save_pretrained(str(ckpt))
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in args.meshes.split(","):
        plan = mesh_plan(cfg, name, gpus, 128, 8192 if not args.tiny else 64, args.model)
        for graphs in (True, False):  # graphs first; without them if a graph fails on this mesh
            try:
                r = measure(plan, cfg, ckpt, device, args.backend, graphs, args.tiny, MESHES[name].get("all_reduce", "auto"),
                            args.lookahead)
                r["cuda_graphs"] = graphs
                break
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}", "cuda_graphs": graphs}
                print(name, "graphs" if graphs else "eager", r["error"], flush=True)
        report["meshes"][name] = r
        print(name, json.dumps(r), flush=True)
        write_report(args.out, "mesh_speed", report, markdown(report))  # after each mesh: a cut run keeps its figures
    print(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    one = r["meshes"].get("single", {})
    lines = [f"# Parallel modes vs one GPU: {r['model']}", "",
             f"{r['device']}, driver {r.get('driver', '-')}, torch {r['torch']}, transformers {r['transformers']}, "
             f"layers {r['backend']}"
             f"{'' if r.get('lookahead', True) else ' (look-ahead off)'}, decode steps "
             f"as CUDA graphs where they ran. Command: `{r['command']}`.", "",
             "| mesh | decode step, batch 1 | vs one GPU | TTFT 8192 tokens | vs one GPU | 64 concurrent: output tok/s | "
             "vs one GPU | modes run | greedy tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["meshes"].items():
        if "error" in x:
            lines.append(f"| {name} | error: {x['error'][:100]} | | | | | | | |")
            continue

        def ratio(k: str, f: str, inverse: bool = False) -> str:
            if "error" in one or k not in one:
                return "-"
            v, w = x[k][f], one[k][f]
            return f"{(w / v if inverse else v / w):.2f}x"

        lines.append(f"| {name}{'' if x['cuda_graphs'] else ' (no graphs)'} | {x['decode_b1']['decode_step_ms']} ms | "
                     f"{ratio('decode_b1', 'decode_step_ms')} | {x['prefill']['ttft_ms_p50']} ms | "
                     f"{ratio('prefill', 'ttft_ms_p50')} | {x['concurrent']['output_tok_s']} | "
                     f"{ratio('concurrent', 'output_tok_s')} | {x['modes']} | {same_tokens(r, name)} |")
    return "\n".join(lines) + "\n"


def same_tokens(r: dict[str, Any], name: str) -> str:
    """Whether a mesh's greedy tokens equal those of the mesh it must match (``same_as``)."""
    ref = MESHES.get(name, {}).get("same_as")
    mine, theirs = r["meshes"][name].get("greedy_tokens"), r["meshes"].get(ref or "", {}).get("greedy_tokens")
    if ref is None or mine is None or theirs is None:
        return "-"
    return f"{'same as' if mine == theirs else 'DIFFER from'} {ref}'s"


if __name__ == "__main__":
    main()
