"""Point 2: the same engine under torchrun (rank 0 drives, every rank works)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import executors
from executors import Request, Sampling
from executors.engine import free_port
from plans.schema import Plan, save_plan
from tests.tiny.helpers import IMAGE_TOKEN, make_plan

ROOT = Path(__file__).resolve().parents[1]


def _torchrun_plan_run(plan: Plan, tmp_path: Path, ranks: int, *args: str) -> list[int]:
    """``torchrun --nproc-per-node RANKS plan run PLAN ARGS``: the tokens rank 0 prints."""
    path = tmp_path / "p.plan.yaml"
    save_plan(plan, path)
    # the console script beside this interpreter (the venv need not be on PATH), else PATH's
    beside = Path(sys.executable).parent / "plan"
    plan_exe = str(beside) if beside.is_file() else shutil.which("plan")
    assert plan_exe, "the `plan` console script is not installed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), plan_exe,
         "run", str(path), *args], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tokens:")]
    assert len(lines) == 1  # only rank 0 prints
    return [int(t) for t in lines[0].split()[1:]]


def test_plan_run_under_torchrun_matches_single_rank(tmp_path: Path) -> None:
    got = _torchrun_plan_run(make_plan("qwen2", pp=2), tmp_path, 2, "--tokens", "5,6,7,8", "-n", "8", "--seed", "3")
    with executors.load(make_plan("qwen2"), seed=3) as eng:
        want = eng.generate([Request(tokens=[5, 6, 7, 8])], max_new_tokens=8, sampling=Sampling())[0].tokens
    assert got == want


def test_dedicated_encoder_rank_under_torchrun(tmp_path: Path) -> None:
    """One LLM rank + one dedicated encoder rank: the image goes out with rank 0's step broadcast
    (the CLI prepends the image token)."""
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (60, 90), (200, 30, 40)).save(img)
    plan = make_plan("qwen2_vl", placement="dedicated", dedicated=1)
    got = _torchrun_plan_run(plan, tmp_path, 2, "--tokens", "7,8", "--image", str(img), "-n", "6", "--seed", "3")
    with executors.load(make_plan("qwen2_vl"), seed=3) as eng:
        want = eng.generate([Request(tokens=[IMAGE_TOKEN, 7, 8], images=[img])], max_new_tokens=6, sampling=Sampling())[0].tokens
    assert got == want


def test_two_torchrun_nodes_match_one_rank(tmp_path: Path) -> None:
    """A plan for 2 nodes x 1 GPU (pp2 across the nodes) launched as two torchrun nodes, one process
    each, rendezvous on the loopback address: the same tokens as one rank. The launch lines::

        torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr 127.0.0.1 --master-port P plan run PLAN ...
        torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --master-addr 127.0.0.1 --master-port P plan run PLAN ...
    """

    from plans.schema import Hardware

    base = make_plan("qwen2", pp=2)
    plan = base.model_copy(update={"hardware": Hardware(gpu="cpu", gpus_per_node=1, nodes=2)}).check()
    path = tmp_path / "p.plan.yaml"
    save_plan(plan, path)
    beside = Path(sys.executable).parent / "plan"
    plan_exe = str(beside) if beside.is_file() else shutil.which("plan")
    assert plan_exe, "the `plan` console script is not installed"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(k), "--master-addr", "127.0.0.1", "--master-port", str(port), plan_exe, "run", str(path), "--tokens",
         "5,6,7,8", "-n", "8", "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tmp_path) for k in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    lines = [ln for out, _err in outs for ln in out.splitlines() if ln.startswith("tokens:")]
    assert len(lines) == 1  # only global rank 0 (node 0) prints
    with executors.load(make_plan("qwen2"), seed=3) as eng:
        want = eng.generate([Request(tokens=[5, 6, 7, 8])], max_new_tokens=8, sampling=Sampling())[0].tokens
    assert [int(t) for t in lines[0].split()[1:]] == want
