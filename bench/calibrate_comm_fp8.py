"""The multi-GPU part of the calibration, bounded in time: collective tables and FP8 GEMMs.

    python bench/calibrate_comm_fp8.py --out DIR [--budget-s 170]
    python bench/calibrate_comm_fp8.py --out DIR --fp8-only --max-m 256 --budget-s 540   # one GPU

On a machine with N >= 2 GPUs: all-reduce, all-gather, reduce-scatter, all-to-all and a
send/recv pair, 4 KiB to 256 MiB in factors of 4, for each group size 2, 4, ... N, timed inside
CUDA graphs and eagerly (``costmodels.calib_collectives``); then FP8 GEMMs on the bf16 GEMM grid,
each the call ``executors.quant.linear`` makes (the Triton W8A16 kernel up to
``executors.fp8_gemm.W8A16_MAX_M`` rows, the Triton W8A8 kernel up to ``executors.fp8_gemm.MAX_M``,
``torch._scaled_mm`` with the activation quantization above; each point names its kernel), until the budget is spent (``costmodels.calibrate.run_comm_fp8``).
``--fp8-only`` skips the collectives and ``--max-m`` keeps the GEMM rows up to that many (the
decode sizes, where the engine's kernel changed). An op that fails is recorded with its error
and the rest go on; without FP8 tensor cores the GEMMs are skipped with the reason.

Writes DIR/comm_fp8.json. Merge it into a profile on any machine (no GPU, no torch; FP8 points
replace the profile's points of the same (m, n, k), the profile's other points stay):

    python -m costmodels.merge DIR/comm_fp8.json costmodels/profiles/h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for comm_fp8.json")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop timing new points after this many seconds")
    ap.add_argument("--collectives-s", type=float, default=90.0, help="deadline of the collective part")
    ap.add_argument("--fp8-only", action="store_true", help="skip the collectives (FP8 GEMMs only)")
    ap.add_argument("--max-m", type=int, default=None, help="FP8 GEMM rows up to this many (default: the whole grid)")
    a = ap.parse_args(argv)
    from costmodels.calibrate import run_comm_fp8

    a.out.mkdir(parents=True, exist_ok=True)
    raw = run_comm_fp8(budget_s=a.budget_s, collectives_s=a.collectives_s, fp8_only=a.fp8_only, max_m=a.max_m)
    raw["meta"]["command"] = " ".join(["python", "bench/calibrate_comm_fp8.py", *(argv if argv is not None else sys.argv[1:])])
    path = a.out / "comm_fp8.json"
    path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {path}: {len(raw.get('collectives', []))} collective points, {len(raw['gemm_fp8'])} FP8 GEMM "
          f"points in {raw['seconds']:.0f} s; skipped: {raw['skipped'][:3]}; errors: {raw.get('collectives_errors', [])[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
