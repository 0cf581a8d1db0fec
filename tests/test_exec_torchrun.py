"""Point 2: the same engine under torchrun (rank 0 drives, every rank works)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import executors
from executors import Request, Sampling
from plans.schema import save_plan
from tests.tiny.helpers import make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_plan_run_under_torchrun_matches_single_rank(tmp_path: Path) -> None:
    plan = make_plan("qwen2", pp=2)
    path = tmp_path / "p.plan.yaml"
    save_plan(plan, path)
    # the console script beside this interpreter (the venv need not be on PATH), else PATH's
    beside = Path(sys.executable).parent / "plan"
    plan_exe = str(beside) if beside.is_file() else shutil.which("plan")
    assert plan_exe, "the `plan` console script is not installed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", plan_exe, "run",
         str(path), "--tokens", "5,6,7,8", "-n", "8", "--seed", "3"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tokens:")]
    assert len(lines) == 1  # only rank 0 prints
    got = [int(t) for t in lines[0].split()[1:]]
    with executors.load(make_plan("qwen2"), seed=3) as eng:
        want = eng.generate([Request(tokens=[5, 6, 7, 8])], max_new_tokens=8, sampling=Sampling())[0].tokens
    assert got == want
