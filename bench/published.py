"""Predictions checked against published 8-GPU (and 2-GPU) results of the best engines.

    python bench/published.py                 # writes bench/results/published.json and .md
    python bench/published.py --only trtllm   # the cases whose id contains 'trtllm' (prints, writes nothing)

Each case is a spec under examples/published/ that reproduces a published setup as closely as the
spec allows (model, FP8 weights and KV, GPU, GPU count, the workload's length statistics, and the
engine's configuration as published: mesh, sequences a replica runs, a step's token budget). The
prediction is made the way `plan simulate` makes it: a plan pinned to the spec's mesh
(``planner.pinned``; where a spec lists several, each is simulated and the best kept), the spec's
synthetic workload, the serving simulator. Two kinds of figure:

* ``offline`` (MLPerf Offline, trtllm-bench throughput): every request queued at t = 0; output
  tokens/s over the saturated part of the run, [0, first token of the last admitted request] (the
  drain after it, where the batch empties, is left out: MLPerf runs 24,576 samples and trtllm-bench
  1,500-3,000, so their drain is a small share of the run);
* ``server`` (MLPerf Server / Interactive): Poisson arrivals at the published throughput / the mean
  output length; the predicted mean TTFT and mean TPOT against the published means, and the p99s
  against the scenario's limits.

The ``plan estimate`` (static batch) figure of each offline case is reported beside it, for reference.
``RATIO_BAND`` is the acceptance band: predicted / published within [0.8, 1.2]; a case outside it
carries its explanation in ``GAPS``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.estimate import estimate  # noqa: E402
from costmodels.simulator import coster_for  # noqa: E402
from planner.inputs import cost_model_of, workload_of  # noqa: E402
from planner.pinned import pinned_plan  # noqa: E402
from planner.spec import load_spec  # noqa: E402
from plans.errors import UserError  # noqa: E402

SPECS = ROOT / "examples" / "published"
OUT_JSON = ROOT / "bench" / "results" / "published.json"
OUT_MD = ROOT / "bench" / "results" / "published.md"
BEFORE_JSON = ROOT / "bench" / "results" / "published.before.json"
# the results as committed before the 2 x H200 calibration (FP8 GEMMs and collectives) was merged into the
# h200 profile: FP8 GEMMs read the bf16 table at the FP8 peak, collectives the datasheet alpha-beta figures
PRECALIB_JSON = ROOT / "bench" / "results" / "published.precalib.json"
# the results as committed before per-tensor FP8 GEMMs were measured: the tensorrt specs' FP8 linears read this
# repository's engine's FP8 kernels (per-row scales)
ENGINE_FP8_JSON = ROOT / "bench" / "results" / "published.engine_fp8.json"
# the results as committed before an all-reduce over a whole node read the published NCCL bus bandwidth
# (``costmodels.hardware.NODE_ALL_REDUCE_GBPS``) instead of the 2-GPU fit
NODE_AR_JSON = ROOT / "bench" / "results" / "published.before_node_all_reduce.json"
# the results as committed before the MLPerf specs took NVIDIA's published engine configuration (mesh, sequences a
# replica runs, a step's token budget): the mesh was the best the bench found, the budgets 8,192 tokens
CONFIG_JSON = ROOT / "bench" / "results" / "published.before_engine_config.json"
# earlier results shown beside the current ratios, newest first: (column title, file)
HISTORY = [("ratio before the published engine configs", CONFIG_JSON), ("ratio before the node all-reduce", NODE_AR_JSON),
           ("ratio with the engine's FP8 kernels", ENGINE_FP8_JSON), ("ratio before the H200 calibration merge", PRECALIB_JSON)]
RATIO_BAND = (0.8, 1.2)
OFFLINE_RATE = 1e6  # requests/s: every request arrives within a few ms of t = 0

MLPERF = ("MLPerf Inference v5.0, closed division, NVIDIA's 8x H200-SXM-141GB TensorRT submission: the result "
          "logs (mlcommons/inference_results_v5.0 closed/NVIDIA/results/H200-SXM-141GBx8_TRT/<benchmark>/<scenario>/"
          "performance/run_1/mlperf_log_summary.txt: tokens/s, samples/s, TTFT and TPOT means and percentiles); "
          "scenario limits from mlcommons/inference loadgen/mlperf.conf")
TRTLLM = ("TensorRT-LLM performance overview, LLaMA v3.3 70B table (NVIDIA/TensorRT-LLM "
          "docs/source/developer-guide/perf-overview.md; "
          "https://nvidia.github.io/TensorRT-LLM/developer-guide/perf-overview.html; figures, PyTorch backend, "
          "fixed lengths and request counts read there)")


@dataclass
class Case:
    id: str
    spec: str  # file under examples/published/
    kind: str  # offline | server
    source: str
    published: dict[str, float]  # metric -> published value
    per_gpu: bool = False  # the throughput figure is per GPU
    limits: dict[str, float] = field(default_factory=dict)  # server: p99 limits (ms)
    sweep_input: tuple[float, ...] = ()  # input means to re-run the chosen mesh at (sensitivity)
    no_evict: bool = True  # TensorRT-LLM's scheduler: admit only with KV for the whole output (no preemption)
    # the executor forms the next step while one computes, as this repository's engine does (its look-ahead):
    # TensorRT-LLM's PyTorch backend ("overlap scheduler", on by default); not its C++ executor (below)
    overlap: bool = False


CASES = [
    Case("mlperf5-llama2-70b-offline", "mlperf5-llama2-70b-offline-8xh200.yaml", "offline", MLPERF,
         {"output_tok_s": 34988.0}, sweep_input=(150, 600)),
    Case("mlperf5-llama2-70b-interactive", "mlperf5-llama2-70b-interactive-8xh200.yaml", "server", MLPERF,
         {"output_tok_s": 19424.0, "ttft_mean_ms": 119.0, "tpot_mean_ms": 33.7},
         limits={"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0}, sweep_input=(150, 600)),
    Case("mlperf5-llama3.1-405b-offline", "mlperf5-llama3.1-405b-offline-8xh200.yaml", "offline", MLPERF,
         {"output_tok_s": 560.65}, sweep_input=(4700, 14100)),
    Case("mlperf5-llama3.1-405b-server", "mlperf5-llama3.1-405b-server-8xh200.yaml", "server", MLPERF,
         {"output_tok_s": 291.37, "ttft_mean_ms": 1830.0, "tpot_mean_ms": 53.9},
         limits={"ttft_p99_ms": 6000.0, "tpot_p99_ms": 175.0}, sweep_input=(4700, 14100)),
    *[Case(f"trtllm-llama3.3-70b-tp2-{g}-{w}", f"trtllm-llama3.3-70b-fp8-tp2-{g}-{w}.yaml", "offline", TRTLLM,
           {"output_tok_s_per_gpu": v}, per_gpu=True, overlap=True)
      for g, w, v in (("h200", "1k1k", 2587.0), ("h200", "8k1k", 537.0), ("h100", "1k1k", 2209.0),
                      ("h100", "8k1k", 398.0))],
]

# Where a ratio falls outside RATIO_BAND, the stated difference in setup that explains it (filled in
# from the results; an unexplained gap is a failure of the check, see tests/test_published.py).
GAPS: dict[str, str] = {
    "mlperf5-llama3.1-405b-server": (
        "queueing past the predicted capacity, which is below the published one: the published rate is above the "
        "model's own capacity, so the simulated queue grows and mean TTFT at that rate is high. At its own capacity "
        "(the limits line above: both systems at the rate each can certify) its mean TTFT and TPOT are within the "
        "band. The input mean is assumed (9,400 tokens, not published in what was read), and near capacity mean TTFT "
        "follows it by more than the gap: the sensitivity row above (half and twice the mean) brackets the published "
        "figure widely. And the TP8 all-reduces read the "
        "published 8-GPU NVSwitch bandwidth, not a measurement on this machine (the `collectives at 8 GPUs` fix)."),
}


def _label(m: dict[str, int]) -> str:
    return "x".join(f"{k}{v}" for k, v in m.items() if v > 1) or "1 GPU"


def spec_meshes(spec) -> list[dict[str, int]]:
    """The meshes a published spec pins: every combination of its ``search`` lists of dp, tp, pp and sp
    (each spec pins the one its publication ran)."""
    axes = ("dp", "tp", "pp", "sp")
    lists = [getattr(spec.search, a) for a in axes]
    if any(v is None for v in lists):
        raise UserError(f"{spec.name}: a published spec pins its mesh (search: dp, tp, pp and sp lists)")
    return [{a: v for a, v in zip(axes, combo) if v > 1} for combo in itertools.product(*lists)]


def run_case(case: Case, log=print, before: bool = False) -> dict[str, Any]:
    """Simulate ``case`` on each mesh its spec pins; ``before``: the models as they were before the fixes
    this check led to (vLLM-style admission that preempts, HF's unfused memory-bound ops)."""
    spec = load_spec(SPECS / case.spec)
    meshes = spec_meshes(spec)
    if before:
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"backend": "eager"})})
        case = replace(case, no_evict=False, sweep_input=())
    cost, _ = cost_model_of(spec)
    wl = workload_of(spec, cost.info)
    gpus = spec.hardware.world_size
    tried = []
    for mesh in meshes:
        try:
            plan = pinned_plan(spec, cost, max_seqs=spec.search.max_seqs, name=f"{spec.name}-{_label(mesh)}", **mesh)
        except UserError as e:
            tried.append({"mesh": _label(mesh), "skipped": str(e)})
            continue
        t0 = time.perf_counter()
        row = _simulate(case, spec, cost, plan, wl)
        if case.kind == "server":
            row["capacity"] = server_capacity(case, spec, cost, plan, wl)
        row.update(mesh=_label(mesh), sim_s=round(time.perf_counter() - t0, 1))
        tried.append(row)
        log(f"  {case.id} {row['mesh']}: " + ", ".join(f"{k} {row[k]:.4g}" for k in case.published if k in row))
    runs = [r for r in tried if "skipped" not in r]
    if not runs:
        raise UserError(f"{case.id}: no pinned mesh fits: {tried}")
    key = "output_tok_s_per_gpu" if case.per_gpu else "output_tok_s"
    if case.kind == "server":  # the mesh with the most throughput within the limits (what a submitter runs)
        best = max(runs, key=lambda r: r["capacity"]["output_tok_s"])
    else:
        best = max(runs, key=lambda r: r[key])
    out: dict[str, Any] = {"id": case.id, "spec": f"examples/published/{case.spec}", "kind": case.kind,
                           "source": case.source, "gpus": gpus, "gpu": spec.hardware.gpu,
                           "mesh": best["mesh"], "profile": cost.profile_id,
                           "fp8_gemm_source": cost.fp8_gemm_source, "candidates": tried,
                           "metrics": {}}
    for metric, pub in case.published.items():
        pred = best["capacity"]["output_tok_s"] if case.kind == "server" and metric == "output_tok_s" else best[metric]
        out["metrics"][metric] = {"published": pub, "predicted": round(pred, 4), "ratio": round(pred / pub, 4)}
    if case.limits:
        out["capacity"] = best["capacity"]
        out["limits"] = case.limits
        out["predicted_p99"] = {k: round(best[k], 2) for k in case.limits}
        out["meets_limits"] = best["meets_limits"]
    if case.kind == "offline":
        mesh = next(m for m in meshes if _label(m) == best["mesh"])
        w = spec.workload
        b = min(spec.search.max_seqs, best["kv_tokens"] // int(w.input_tokens.mean + w.output_tokens.mean))
        est = estimate(cost, tp=mesh.get("tp", 1), pp=mesh.get("pp", 1), dp=mesh.get("dp", 1),
                       batch=b * mesh.get("dp", 1), isl=int(w.input_tokens.mean), osl=int(w.output_tokens.mean),
                       max_batch_tokens=spec.search.max_batch_tokens, world=gpus,
                       gpus_per_node=spec.hardware.gpus_per_node)
        val = est.output_tok_s / (gpus if case.per_gpu else 1)
        out["estimate"] = {"batch": b * mesh.get("dp", 1), "output_tok_s": round(val, 2),
                           "ratio": round(val / case.published[key], 4),
                           "command": f"plan estimate examples/published/{case.spec} "
                                      + " ".join(f"--{k} {v}" for k, v in mesh.items())
                                      + f" --batch {b * mesh.get('dp', 1)} --isl {int(w.input_tokens.mean)} "
                                        f"--osl {int(w.output_tokens.mean)}"}
    if case.sweep_input:
        out["input_mean_sweep"] = input_mean_sweep(case, spec, cost, next(m for m in meshes if _label(m) == best["mesh"]))
    out["command"] = f"python bench/published.py --only {case.id}"
    return out


def input_mean_sweep(case: Case, spec, cost, mesh: dict[str, int]) -> list[dict[str, Any]]:
    """The case again at each of ``case.sweep_input`` input means (the datasets' means are assumed):
    each published figure's ratio there, the Server throughput at the capacity the limits allow."""
    w = spec.workload
    rows = []
    for mean in case.sweep_input:
        s2 = spec.model_copy(update={"workload": w.model_copy(update={
            "input_tokens": w.input_tokens.model_copy(update={"mean": float(mean)})})})
        plan = pinned_plan(s2, cost, max_seqs=spec.search.max_seqs, **mesh)
        wl2 = workload_of(s2, cost.info)
        r = _simulate(case, s2, cost, plan, wl2)
        if case.kind == "server":
            r["output_tok_s"] = server_capacity(case, s2, cost, plan, wl2)["output_tok_s"]
        rows.append({"input_mean": mean, "ratios": {m: round(r[m] / pub, 4) for m, pub in case.published.items()}})
    return rows


def sim_config(case: Case, plan):
    """The simulator's configuration of ``plan`` with the published engine's scheduler: no-evict
    admission (``SimConfig.reserve_output``), and the look-ahead only where the executor overlaps its
    scheduling with the GPU (``Case.overlap``)."""
    from costmodels.simulator.config import SimConfig

    cfg = SimConfig.from_plan(plan)
    return replace(cfg, reserve_output=case.no_evict, lookahead=cfg.lookahead and case.overlap)


def _simulate(case: Case, spec, cost, plan, wl) -> dict[str, Any]:
    """One simulation of ``plan`` on ``wl`` (offline: every request at t = 0)."""
    from costmodels.simulator.engine import run
    from costmodels.simulator.metrics import summarize

    if case.kind == "offline":
        wl = wl.with_rate(OFFLINE_RATE)
    reqs = wl.sample(spec.workload.seed)
    cfg = sim_config(case, plan)
    coster = coster_for(plan, cost)
    log = run(cfg, coster, reqs)
    res = summarize(log)
    row: dict[str, Any] = {"kv_tokens": int(plan.memory_gb.kv_tokens), "preemptions": res.preemptions,
                           "ttft_mean_ms": res.ttft_ms["mean"], "tpot_mean_ms": res.tpot_ms["mean"],
                           "ttft_p99_ms": res.ttft_ms["p99"], "tpot_p99_ms": res.tpot_ms["p99"],
                           "mean_step_tokens": round(res.mean_step_tokens, 1)}
    tok_s = saturated_output_tok_s(log) if case.kind == "offline" else res.output_tok_s
    row["output_tok_s"] = tok_s
    row["output_tok_s_per_gpu"] = tok_s / plan.mesh.size
    if case.limits:
        row["meets_limits"] = all(row[k] <= v for k, v in case.limits.items()) and res.completed == len(reqs)
    return row


def server_capacity(case: Case, spec, cost, plan, wl, steps: int = 7) -> dict[str, Any]:
    """The highest Poisson rate (bisection between 1/8 and 2x the published one) whose p99 TTFT and
    p99 TPOT stay within the case's limits, and the output tokens/s served there (MLPerf Server's
    figure: the rate a submitter can certify)."""
    pub_rate = case.published["output_tok_s"] / spec.workload.output_tokens.mean  # the spec's mean: as generated
    lo, hi, best = pub_rate / 8, pub_rate * 2, None
    r = _simulate(case, spec, cost, plan, wl.with_rate(lo))
    if not r["meets_limits"]:
        return {"rate_rps": 0.0, "output_tok_s": 0.0, "note": f"limits missed even at {lo:.3g} req/s"}
    best = (lo, r)
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        r = _simulate(case, spec, cost, plan, wl.with_rate(mid))
        if r["meets_limits"]:
            lo, best = mid, (mid, r)
        else:
            hi = mid
    rate, r = best
    return {"rate_rps": round(rate, 4), "output_tok_s": round(r["output_tok_s"], 2),
            "ttft_p99_ms": round(r["ttft_p99_ms"], 1), "tpot_p99_ms": round(r["tpot_p99_ms"], 2),
            "ttft_mean_ms": round(r["ttft_mean_ms"], 1), "tpot_mean_ms": round(r["tpot_mean_ms"], 2)}


def saturated_output_tok_s(log) -> float:
    """Output tokens/s of a run with every request queued at t = 0, over [0, the last first token]."""
    from costmodels.simulator.metrics import _window_tokens
    from costmodels.simulator.state import DONE

    done = [r for r in log.reqs if r.state == DONE]
    end = max(r.first for r in done)
    out, _, width = _window_tokens(done, 0.0, end)
    return out / width


FIXES = [
    ("engine configuration as published", "NVIDIA publishes each MLPerf submission's engine configuration beside its "
     "results (mlcommons/inference_results_v5.0 closed/NVIDIA/configs/<benchmark>/<scenario>/__init__.py; each spec's "
     "header names its class). On 8 x H200, Llama-2-70B runs 8 single-GPU replicas (tensor and pipeline parallelism 1) "
     "with a step budget (`max_num_tokens`, decodes included) of 1,536 tokens and 2,048 sequences a replica Offline, "
     "256 tokens and 512 sequences Interactive; Llama-3.1-405B runs TP4 x PP2 Offline (1,536 tokens, 512 sequences) "
     "and TP8 Server (2,560 tokens, 64 sequences). The specs had none of it: the bench took the best of up to six "
     "meshes, with 8,192-token steps and up to 512 or 2,048 sequences. The specs now pin what was published, and the "
     "bench reads the mesh from them (`spec_meshes`). Before -> after (the `ratio before the published engine configs` "
     "column): Llama-2-70B Interactive capacity 1.23 -> 1.04 and mean TTFT 0.79 -> 1.15 (256 tokens a step spread a "
     "~300-token prompt over two or more steps beside ~80 decodes); 405B Offline 0.82 -> 0.85 on the published TP4 x PP2 "
     "(the bench had picked TP8); 405B Server capacity 0.90 -> 0.84 with at most 64 sequences; Llama-2-70B Offline "
     "0.86 -> 0.84. The TensorRT-LLM table's TP2 cases (mesh published, budgets not) do not move."),
    ("collectives at 8 GPUs", "all-reduces over a whole node were priced by the alpha-beta fit of the 2-GPU "
     "measurement (bus 300.6 GB/s); on an NVSwitch node NCCL reduces in the switch (NVLink SHARP), and 8 H100s "
     "reach 460-480 GB/s bus bandwidth in `nccl-tests` (published reference figures; the H200 has the same NVLink "
     "and NVSwitch). Such all-reduces now read 470 GB/s (`costmodels.hardware.NODE_ALL_REDUCE_GBPS`); other "
     "collectives and smaller groups keep the fit. Before -> after (the `ratio before the node all-reduce` column): "
     "405B Offline 0.73 -> 0.82, 405B Server capacity 0.69 -> 0.90, mean TTFT 1.62 -> 1.27, mean TPOT 1.26 -> 1.01 "
     "(TP8 prefill of ~9.4k-token prompts carries 2 x 126 all-reduces of T x 16,384 bf16 values a step); the "
     "other cases run no 8-GPU group and do not move."),
    ("scheduling overlap", "This repository's engine forms each step while the last one computes (its look-ahead), "
     "so a request arriving during a step joins only the step after next; the simulator does the same for its plans. "
     "TensorRT-LLM's C++ executor, which the MLPerf harness drives, forms a step after the last one's results: its "
     "overlap of the two (`enableTrtOverlap` in `ExecutorConfig`, NVIDIA/TensorRT-LLM#3625) is off unless set, and the "
     "NVIDIA harness code read leaves it off (mlcommons/inference_results_v4.0 closed/NVIDIA/code/harness/harness_llm/"
     "main_llm.cc: `DEFINE_bool(enable_trt_overlap, false, ...)`; the v4.1 Llama-2-70B Server config sets no overlap; "
     "the v5.0 harness's setting was not found and is assumed the same). Its PyTorch backend overlaps by default "
     "(`disable_overlap_scheduler`, NVIDIA/TensorRT-LLM#4174; "
     "https://nvidia.github.io/TensorRT-LLM/features/overlap-scheduler.html), the backend of the TensorRT-LLM table. "
     "The MLPerf cases now simulate without the look-ahead (`Case.overlap`), the table's cases with it. Before -> after: "
     "Llama-2-70B Interactive mean TTFT 1.21 -> 0.98x and capacity 1.00 -> 1.04x; 405B Server mean TTFT 1.29 -> 1.28x "
     "(its steps exceed 2,048 tokens, after which no step is formed ahead anyway); the offline figures move by under 0.1%."),
    ("scheduler", "TensorRT-LLM admits a request only when the KV cache can hold its whole output "
     "(GUARANTEED_NO_EVICT, its default capacity policy); the simulator admitted on the prompt alone, vLLM-style, "
     "so full batches ran out of KV and preempted (recomputing) thousands of times. The published cases now "
     "simulate with `SimConfig.reserve_output`."),
    ("memory-bound ops", "the profile's memory-op tables time HF's eager implementations (RMSNorm is ~7 kernels: "
     "1.65 ms for 8192 x 16384 elements on the H200, against 0.12 ms for one read + write pass). An engine that "
     "fuses them (TensorRT-LLM; this repo's compile backend) pays one pass: memory-bound ops of a plan or spec "
     "whose runtime backend is not eager now cost their bytes at the bandwidth the profile measured for `add`. "
     "The published specs say `runtime: {backend: tensorrt}`; every example spec is eager, so no golden plan moves."),
]

POINT3 = ("Measured on 2 x H200 (NVLink; driver 580.159.04, torch 2.11.0+cu130, NCCL 2.28.9; "
          "`python bench/calibrate_comm_fp8.py --out DIR --budget-s 150`, merged into `costmodels/profiles/h200.json` "
          "by `python -m costmodels.merge`): 2,662 FP8 GEMM points (`torch._scaled_mm`, e4m3 operands with per-row / "
          "per-column fp32 scales and bf16 output, as `executors/quant.py` calls it) on the bf16 GEMM grid, and 72 "
          "collective points (all-reduce, all-gather, reduce-scatter in CUDA graphs and eagerly; all-to-all and p2p "
          "eagerly) for a group of 2. FP8-weight linears now read the measured `gemm_fp8` table "
          "(`CostModel.fp8_gemm_source` = measured). Against the bf16 GEMM of the same shape (medians over the "
          "grid's N and K) the FP8 call takes 0.55-0.59x the time at M >= 4096 (the 0.5x the scaled table assumed), 0.65-0.88x at M = 384-1536, and "
          "1.0-1.3x at M = 16-256: at decode batch sizes it is slower than bf16 despite reading half the bytes. "
          "Groups of 2 GPUs read the measured collective tables (the TensorRT-LLM TP2 cases); larger groups use the "
          "alpha-beta formulas on the link fitted to the graph-timed 2-GPU all-reduce (bus 300.6 GB/s against 360 "
          "from the datasheet, 11 us latency floor). Effect, in the `ratio before the H200 calibration merge` "
          "column: every H200 throughput figure moved down; the TP2 H200 cases into the middle of the band (1.20 -> 1.03, "
          "1.09 -> 0.95), the decode-heavy MLPerf cases below it (the gaps below: the measured kernel is this "
          "repository's, not TensorRT-LLM's). The H100 cases do not move (no FP8 or collective measurement on the "
          "H100). Later, the engine's own FP8 kernels on the whole grid (`bench/results/fp8_kernels_calibration.md`, "
          "2,420 points, two H200 each timing half the (N, K) pairs) replaced the table's points up to 64 rows, the "
          "engine's Triton kernels' range (`python -m costmodels.merge bench/results/fp8_kernels_calibration.json "
          "costmodels/profiles/h200.json --max-m 64`): every published ratio moved by under 1% but the 405B Server's "
          "mean TPOT, 1.98x -> 2.11x. Then per-tensor FP8 GEMMs (`python bench/calibrate_comm_fp8.py --out DIR --fp8-only "
          "--fp8-kernel tensor --budget-s 330` on one H200, 3,630 points on the whole grid in 42 s, "
          "`bench/results/fp8_tensor_calibration.json`, merged as the profile's `gemm_fp8_tensor` table): `torch._scaled_mm` "
          "with one fp32 scale per operand, x already e4m3 (TensorRT-LLM's FP8 recipe writes it from the previous op). "
          "Medians against the bf16 GEMM: 0.65-0.67x at 1-16 rows, 0.64-0.72x at 24-512, 0.55-0.59x at 1,024 and "
          "more; against the engine's kernels 0.5-0.76x at 1-256 rows. Plans and specs whose backend is `tensorrt` "
          "read it (`costmodels.model.fp8_kernels_for`; `CostModel.fp8_gemm_source` = measured, per-tensor scales); "
          "the others keep the engine's table. Effect: the `ratio with the engine's FP8 kernels` column.")


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def render_md(rows: list[dict[str, Any]], meta: dict[str, Any], before: dict[str, Any] | None) -> str:
    prev = {r["id"]: r for r in (before or {}).get("cases", [])}
    history = [{r["id"]: r for r in (json.loads(f.read_text()) if f.is_file() else {}).get("cases", [])}
               for _title, f in HISTORY]

    def earlier(cases: dict[str, Any], r: dict[str, Any], m: str) -> str:
        """The ratio of metric ``m`` of case ``r`` in earlier results (its mesh where it differs)."""
        old = cases.get(r["id"], {})
        v = old.get("metrics", {}).get(m)
        return "" if not v else f"{v['ratio']:.2f}" + ("" if old["mesh"] == r["mesh"] else f" ({old['mesh']})")
    lines = ["# Predictions against published results", "",
             "Regenerate: `python bench/published.py` (about "
             f"{max(1, round(meta['wall_s'] / 60))} min on the 2-core dev machine; `--before` regenerates "
             "`published.before.json`, the models before the fixes below). Every predicted figure is the serving "
             "simulator's on a spec under `examples/published/` (its header gives the setup, the sources and what "
             "was assumed where the publication is silent). Acceptance: predicted / published within "
             f"{RATIO_BAND[0]}-{RATIO_BAND[1]}, or the gap explained below. Throughput is output tokens/s "
             "(per GPU for TensorRT-LLM's table); Offline = every request queued at once; Server = the highest "
             "Poisson rate whose p99 TTFT and p99 TPOT meet the scenario's limits, and the mean TTFT / TPOT at the "
             "published rate. `plan simulate` on these specs differs in two ways: its throughput is measured over "
             "the arrival window (offered load), which a burst of every request at once leaves empty, and a plan "
             "file has no field for TensorRT-LLM's no-evict admission.", "",
             "| case | GPUs | mesh | metric | published | predicted | ratio | "
             + " | ".join(title for title, _f in HISTORY) + " | ratio before fixes | static estimate (ratio) |",
             "|---|---:|---|---|---:|---:|---:|" + "---:|" * (len(HISTORY) + 2)]
    for r in rows:
        for i, (m, v) in enumerate(r["metrics"].items()):
            est = r.get("estimate") if i == 0 else None
            e = f"{est['output_tok_s']:,.0f} ({est['ratio']:.2f})" if est else ""
            b = prev.get(r["id"], {}).get("metrics", {}).get(m)
            flag = "" if RATIO_BAND[0] <= v["ratio"] <= RATIO_BAND[1] else " *"
            lines.append(f"| {r['id'] if i == 0 else ''} | {r['gpus'] if i == 0 else ''} | "
                         f"{r['mesh'] if i == 0 else ''} | {m} | {_num(v['published'])} | {_num(v['predicted'])} | "
                         f"{v['ratio']:.2f}{flag} | " + " | ".join(earlier(h, r, m) for h in history)
                         + f" | {format(b['ratio'], '.2f') if b else ''} | {e} |")
    lines += ["", "`*` outside the band: see the gap of that case below.", "",
              "Sources (each spec's header names its own):", ""]
    for s in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"- {s}")
    lines += ["- Workload statistics: mlcommons/inference `language/llama2-70b/README.md` (24,576 OpenOrca "
              "samples, inputs and outputs cut at 1,024 tokens, 294.45 output tokens per sample) and "
              "`language/llama3.1-405b/README.md` (8,313 samples, 684.68 output tokens per sample). The specs use "
              "the output means the submission itself generated (its tokens/s over its samples/s: 291.5-292.1 and "
              "647.5-649.4 tokens).",
              "", "## Fixes made (before -> after: the `ratio before fixes` column, or the column a fix names)", ""]
    lines += [f"- **{k}**: {v}" for k, v in FIXES]
    lines += ["", "## Measured: FP8 GEMMs and collectives on the H200 (issue point 3)", "", POINT3,
              "", "## Per case", ""]
    for r in rows:
        lines.append(f"### {r['id']}")
        lines.append("")
        lines.append(f"- spec `{r['spec']}`, profile `{r['profile']}` (FP8 GEMMs: {r['fp8_gemm_source']}), "
                     f"command `{r['command']}`")
        if "estimate" in r:
            lines.append(f"- static estimate: `{r['estimate']['command']}`")
        if "limits" in r:
            cap = r["capacity"]
            own = ", ".join(f"mean {k.split('_')[0].upper()} {cap[k]} ms ({cap[k] / r['metrics'][k]['published']:.2f}x "
                            "the published)" for k in ("ttft_mean_ms", "tpot_mean_ms") if k in cap and k in r["metrics"])
            lines.append(f"- p99 limits {r['limits']}; at the predicted capacity ({cap['rate_rps']} req/s) p99 TTFT "
                         f"{cap.get('ttft_p99_ms')} ms, p99 TPOT {cap.get('tpot_p99_ms')} ms, {own}; at the published rate "
                         f"p99 {r['predicted_p99']} ({'within' if r['meets_limits'] else 'NOT within'} the limits)")
        cands = "; ".join(f"{c['mesh']}: skipped ({c['skipped']})" if "skipped" in c else
                          f"{c['mesh']}: " + (f"{c['capacity']['output_tok_s']:,.0f} tok/s within the limits, "
                                              if "capacity" in c else f"{c['output_tok_s']:,.0f} tok/s, ")
                          + f"TTFT mean {c['ttft_mean_ms']:,.0f} ms, TPOT mean {c['tpot_mean_ms']:.1f} ms"
                          for c in r["candidates"])
        lines.append(f"- meshes simulated: {cands}")
        if "input_mean_sweep" in r:
            lines.append("- input-mean sensitivity (the mean is assumed; ratios to the published figures"
                         + (", throughput at the capacity the limits allow" if r["kind"] == "server" else "") + "): "
                         + "; ".join(f"{x['input_mean']} tokens -> " + ", ".join(f"{m} {v:.2f}" for m, v in x["ratios"].items())
                                     for x in r["input_mean_sweep"]))
        if r["id"] in GAPS:
            lines.append(f"- gap: {GAPS[r['id']]}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the cases whose id contains this text; print, write nothing")
    ap.add_argument("--render", action="store_true",
                    help="rewrite published.md (and the gaps in published.json) from the committed results, no simulation")
    ap.add_argument("--before", action="store_true",
                    help=f"the models before the fixes (preempting admission, unfused memory ops); writes {BEFORE_JSON.name}")
    args = ap.parse_args(argv)
    if args.render:
        d = json.loads(OUT_JSON.read_text())
        d["gaps"] = GAPS
        d["meta"].pop("not_done", None)
        d["meta"]["fp8_and_collectives"] = POINT3
        OUT_JSON.write_text(json.dumps(d, indent=1) + "\n")
        before = json.loads(BEFORE_JSON.read_text()) if BEFORE_JSON.is_file() else None
        OUT_MD.write_text(render_md(d["cases"], d["meta"], before))
        return 0
    cases = [c for c in CASES if not args.only or args.only in c.id]
    t0 = time.perf_counter()
    rows = []
    for c in cases:
        rows.append(run_case(c, before=args.before))
        for m, v in rows[-1]["metrics"].items():
            print(f"{c.id}: {m} published {v['published']:,.4g} predicted {v['predicted']:,.4g} ratio {v['ratio']:.2f}")
    meta = {"wall_s": time.perf_counter() - t0, "band": RATIO_BAND}
    if args.only:
        return 0
    if args.before:
        BEFORE_JSON.write_text(json.dumps({"cases": rows}, indent=1) + "\n")
        print(f"wrote {BEFORE_JSON.relative_to(ROOT)}")
        return 0
    OUT_JSON.write_text(json.dumps({"meta": {"band": list(RATIO_BAND), "fixes": dict(FIXES), "fp8_and_collectives": POINT3,
                                             "wall_s": round(meta["wall_s"])},
                                    "cases": rows, "gaps": GAPS}, indent=1) + "\n")
    before = json.loads(BEFORE_JSON.read_text()) if BEFORE_JSON.is_file() else None
    OUT_MD.write_text(render_md(rows, meta, before))
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and {OUT_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
