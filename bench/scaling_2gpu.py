"""Step-time speedups of two-GPU meshes over one GPU: the cost model's prediction beside the
engine's measurement (issue 15, point 4).

Measured: ``bench/mesh_speed.py`` reports, first one first (Llama-3.1-8B shapes, bf16,
decode steps as CUDA graphs; layers eager or compiled, the first report's ``backend``): the decode step at
batch 1 (512-token prompt, 128 new tokens: mean context ~576) and the TTFT of one 8,192-token prompt. By
default ``mesh_speed.a2a.json`` (the current engine: Ulysses' all-to-all through the LL kernel, SP x TP
steps graphed; single, sp2), ``mesh_speed.ll_shift.json`` (the build before it: fused all-reduce + add +
norm in the LL protocol, the SiLU in the ``down`` GEMV; single, tp2, shift-sp2; what changed since touches
SP x TP steps only), ``mesh_speed.ll.json``, then ``mesh_speed.gated.json``,
``mesh_speed.fused.json`` and ``mesh_speed.json`` (earlier builds) and ``mesh_speed.pp2.json`` (pp2); a mesh is taken from the first report that has it. Predicted: ``CostModel.step_wall_ms`` of the same shapes with
the H200 profile and this engine's step terms (host side of eager steps, Ulysses exchange, decode GEMV, PP handoff;
``costmodels.steps``) (the eager cost model for eager layers, the fused one for compiled layers, as
the layers ran), per mesh: tp2 (TP over 2), shift(sp2)
(TP over 2 for a decode, SP2 for the prefill), sp2 (SP2 for both: its decode step graphed with the LL
all-to-all's measured times), pp2 (a single request crosses both stages, so its
step is the sum of the stages plus the send and the engine's handoff at the stage boundary,
``costmodels.steps``). Speedup = one GPU's time / the mesh's, each mesh against the single GPU of
its own report; error = predicted speedup / measured speedup - 1. The model prices the current
engine (``costmodels.steps``: symmetric-memory all-reduces in decode graphs, fused with the add and
norm up to 32 rows), so a row measured with an earlier build (its ``measured_from``) compares the
current engine's prediction with that build.

    python bench/scaling_2gpu.py [--mesh-speed FILE ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXT = 512 + 128 // 2  # mean context of the batch-1 decode
PREFILL = 8192
# mesh -> (pp, tp, sp, decode mode, prefill mode)
# the measured reports read by default, first one first (a mesh is taken from the first that has it)
REPORTS = [ROOT / "bench/results" / f for f in
           ("mesh_speed.a2a.json", "mesh_speed.ll_shift.json", "mesh_speed.ll.json", "mesh_speed.gated.json", "mesh_speed.fused.json",
            "mesh_speed.json", "mesh_speed.pp2.json")]
MESHES = {"single": (1, 1, 1, "tp", "tp"), "tp2": (1, 2, 1, "tp", "tp"),
          "shift-sp2": (1, 1, 2, "tp", "sp_tp"), "sp2": (1, 1, 2, "sp_tp", "sp_tp"), "pp2": (2, 1, 1, "tp", "tp")}


def predicted(cost) -> dict[str, dict[str, float]]:
    """Predicted step times (ms) per mesh for the decode and the prefill."""
    from graph.opgraph import StepShape

    dec, pre = StepShape.decode([CONTEXT]), StepShape.prefill([PREFILL])
    return {name: {"decode_ms": cost.step_wall_ms(dec, pp=pp, tp=tp, sp=sp, mode=dm),
                   "prefill_ms": cost.step_wall_ms(pre, pp=pp, tp=tp, sp=sp, mode=pm)}
            for name, (pp, tp, sp, dm, pm) in MESHES.items()}


def measured(mesh_speed: dict) -> dict[str, dict[str, float]]:
    return {name: {"decode_ms": m["decode_b1"]["decode_step_ms"], "prefill_ms": m["prefill"]["ttft_ms_p50"]}
            for name, m in mesh_speed["meshes"].items() if name in MESHES and "decode_b1" in m}


def compare(pred: dict, meas: dict, source: str = "") -> list[dict]:
    """Rows of predicted vs measured speedup over the single GPU, per mesh and step, from one report
    (``source``: its file)."""
    rows = []
    for name in MESHES:
        if name == "single" or name not in meas:
            continue
        for step in ("decode_ms", "prefill_ms"):
            p = pred["single"][step] / pred[name][step]
            m = meas["single"][step] / meas[name][step]
            rows.append({"mesh": name, "step": step[:-3], "predicted_ms": round(pred[name][step], 3),
                         "measured_ms": meas[name][step], "predicted_speedup": round(p, 3),
                         "measured_speedup": round(m, 3), "error": round(p / m - 1, 3), "measured_from": source})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh-speed", type=Path, nargs="+",
                    default=REPORTS,
                    help="mesh_speed reports (each mesh's speedup is taken against the single GPU of its own run; "
                         "a mesh already read is skipped); layers eager or compiled as in the first")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    from bench.common import write_report
    from costmodels.build import cost_model_for
    from graph.hf_config import load_config

    reports = [json.loads(f.read_text()) for f in args.mesh_speed]
    backend = reports[0].get("backend", "eager")
    cost, _ = cost_model_for(load_config(preset="llama-3.1-8b"), "h200", weights_dtype="bf16", kv_dtype="bf16",
                             gpus_per_node=2, fused_elementwise=backend != "eager", engine="shiftplan",
                             backend=backend)
    where = [f.resolve() for f in args.mesh_speed]
    names = [str(w.relative_to(ROOT)) if w.is_relative_to(ROOT) else w.name for w in where]
    pred, meas, rows = predicted(cost), measured(reports[0]), []
    for ms, name in zip(reports, names):
        m = measured(ms)
        rows += [x for x in compare(pred, m, name) if x["mesh"] not in {y["mesh"] for y in rows}]
        meas.update({k: v for k, v in m.items() if k not in meas})
    r = {"command": "python bench/scaling_2gpu.py --out DIR",
         "measured_from": ", ".join(names),
         "backend": backend, "predicted_ms": pred, "measured_ms": meas, "rows": rows}
    lines = ["# Two-GPU step speedups over one GPU: predicted vs measured", "",
             f"Command: `{r['command']}`; measured: {r['measured_from']} (their device and versions; each mesh against the "
             f"single GPU of its own run); predicted: the "
             f"H200 profile's cost model ({backend} layers, as measured). Decode at batch 1, context {CONTEXT}; prefill of {PREFILL} "
             "tokens (measured as TTFT). The model prices the current engine (the first report's build: in decode graphs, "
             "TP all-reduces through symmetric memory, fused with the residual add and RMSNorm up to 32 rows); a row "
             "measured in another report compares it with that report's build.", "",
             "| mesh | step | predicted ms | measured ms | predicted speedup | measured speedup | error | measured in |",
             "|---|---|---|---|---|---|---|---|"]
    for x in [{"mesh": "single", "step": s[:-3], "predicted_ms": round(pred["single"][s], 3),
               "measured_ms": meas["single"][s], "measured_from": names[0]} for s in ("decode_ms", "prefill_ms")] + rows:
        err = f"{x['error']:+.0%}" if "error" in x else "-"
        lines.append(f"| {x['mesh']} | {x['step']} | {x['predicted_ms']} | {x['measured_ms']} | "
                     f"{x.get('predicted_speedup', 1.0)} | {x.get('measured_speedup', 1.0)} | {err} | "
                     f"{Path(x['measured_from']).name} |")
    write_report(args.out, "scaling_2gpu", r, "\n".join(lines) + "\n", echo=True)


if __name__ == "__main__":
    main()
