"""Calibrate the cost model on this machine's GPU and write the profile.

    python bench/calibrate_gpu.py --out DIR [--quick] [--budget-s S]

Writes DIR/<gpu>.json (the catalog name found from the device name, e.g. h100.json); commit
it as costmodels/profiles/<gpu>.json. Same as `plan calibrate -o DIR/<gpu>.json`; the accuracy
benchmark (bench/cost_accuracy.py device) runs this first and then times the validation steps.
On a machine without a CUDA GPU it stops with a clear error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from plans.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for <gpu>.json")
    ap.add_argument("--quick", action="store_true", help="a sparse grid")
    ap.add_argument("--gpu", default=None, help="catalog name (default: from the device name)")
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU, to test the script")
    a = ap.parse_args(argv)
    try:
        from costmodels.calibrate import calibrate, device_meta, find_gpu_name

        name = a.gpu or find_gpu_name(device_meta()["device_name"]) or ("cpu" if a.cpu_dry_run else None)
        if name is None:
            raise UserError("no CUDA GPU of the catalog found (torch.cuda sees none, or an unknown part); "
                            "run on the GPU machine or pass --gpu NAME")
        a.out.mkdir(parents=True, exist_ok=True)
        prof = calibrate(a.out / f"{name}.json", quick=a.quick, gpu=name, cpu_dry_run=a.cpu_dry_run,
                         budget_s=a.budget_s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {a.out / (name + '.json')} ({prof.id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
