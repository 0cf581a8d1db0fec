"""Point 2: the same engine under torchrun (rank 0 drives, every rank works)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import executors
from executors import Request, Sampling
from executors.engine import free_port
from plans.schema import Plan, save_plan
from tests.tiny.helpers import CONFIGS, IMAGE_TOKEN, make_plan

ROOT = Path(__file__).resolve().parents[1]


def _plan_exe() -> str:
    """The ``plan`` console script beside this interpreter (the venv need not be on PATH), else PATH's."""
    beside = Path(sys.executable).parent / "plan"
    plan_exe = str(beside) if beside.is_file() else shutil.which("plan")
    assert plan_exe, "the `plan` console script is not installed"
    return plan_exe


def _two_node_plan(base: Plan, tmp_path: Path) -> Path:
    """``base`` for 2 nodes x 1 CPU, saved as ``tmp_path/p.plan.yaml``."""
    from plans.schema import Hardware

    path = tmp_path / "p.plan.yaml"
    save_plan(base.model_copy(update={"hardware": Hardware(gpu="cpu", gpus_per_node=1, nodes=2)}).check(), path)
    return path


def _torchrun_plan_run(plan: Plan, tmp_path: Path, ranks: int, *args: str) -> list[int]:
    """``torchrun --nproc-per-node RANKS plan run PLAN ARGS``: the tokens rank 0 prints."""
    path = tmp_path / "p.plan.yaml"
    save_plan(plan, path)
    plan_exe = _plan_exe()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), plan_exe,
         "run", str(path), *args], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tokens:")]
    assert len(lines) == 1  # only rank 0 prints
    return [int(t) for t in lines[0].split()[1:]]


def _node(k: int, port: int, *command: str) -> list[str]:
    """The launch line of torchrun node ``k`` of two, one process each, rendezvous on the loopback address."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(k),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *command]


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

    path = _two_node_plan(make_plan("qwen2", pp=2), tmp_path)
    plan_exe = _plan_exe()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = (plan_exe, "run", str(path), "--tokens", "5,6,7,8", "-n", "8", "--seed", "3")
    procs = [subprocess.Popen(_node(k, port, *run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path) for k in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    lines = [ln for out, _err in outs for ln in out.splitlines() if ln.startswith("tokens:")]
    assert len(lines) == 1  # only global rank 0 (node 0) prints
    with executors.load(make_plan("qwen2"), seed=3) as eng:
        want = eng.generate([Request(tokens=[5, 6, 7, 8])], max_new_tokens=8, sampling=Sampling())[0].tokens
    assert [int(t) for t in lines[0].split()[1:]] == want


def _child(pid: int, within: float = 60.0) -> int:
    """The process torchrun's launcher ``pid`` started (its worker), once there is one."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"torchrun {pid} started no worker within {within} s")


def _joined(pid: int, within: float = 60.0) -> None:
    """Wait until process ``pid`` has joined its gloo process group (gloo's threads run in it)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        names = set()
        for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
            with contextlib.suppress(OSError):
                names.add(comm.read_text().strip())
        if any(n.startswith(("gloo", "pt_gloo")) for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} joined no gloo process group within {within} s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker process through /proc")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_node_ends_the_run_with_one_message(tmp_path: Path, how: str) -> None:
    """Two torchrun nodes (pp2 across them) on a long run; mid-run node 1's rank is killed (SIGKILL) or
    stopped (SIGSTOP, a rank that stops answering: its sockets stay open). Node 0's rank prints one
    ``error:`` line naming rank 1 and exits with code 2, which torchrun's report on node 0 shows; no
    traceback of its own. A hang fails the test by the subprocess timeout. ``executors.liveness``:
    a killed rank is named a few beats after gloo's collective fails, a stopped one after
    ``SHIFTPLAN_SILENT_S`` (4 s here) without a heartbeat."""
    cfg = json.loads(CONFIGS["qwen2"].read_text())
    cfg["max_position_embeddings"] = 4096  # room for a run of minutes
    (tmp_path / "long.json").write_text(json.dumps(cfg))
    base = make_plan("qwen2", pp=2)
    model = base.model.model_copy(update={"config": str(tmp_path / "long.json")})
    path = _two_node_plan(base.model_copy(update={"model": model}), tmp_path)
    plan_exe = _plan_exe()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SHIFTPLAN_SILENT_S": "4"}
    procs = [subprocess.Popen(_node(k, port, plan_exe, "run", str(path), "--tokens", "5,6,7,8", "-n", "4000"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for k in (0, 1)]
    workers: list[int] = []
    try:
        workers = [_child(p.pid) for p in procs]
        _joined(workers[1])
        time.sleep(2.0)  # mid-run: the tiny stage is built well within this
        os.kill(workers[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        _out, err = procs[0].communicate(timeout=60)  # node 0: a hang raises TimeoutExpired
    finally:
        for pid in workers:  # a stopped rank, or one left hanging; its launcher then ends
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=30)
            p.kill()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: worker rank 1 on node 1 ") and "died or stopped answering" in errors[0]
    assert "(exitcode: 2)" in err, err[-3000:]  # torchrun's report of rank 0's exit
    rank_part = err[:err.index("(exitcode: 2)")]  # what the rank wrote (torchrun's report, its own traceback, follows)
    assert "Traceback" not in rank_part and "[rank0]" not in err, err[-3000:]
    assert procs[0].returncode != 0


def _two_nodes_stopped(tmp_path: Path, plans: Path | tuple[Path, Path], node_args: tuple[list[str], list[str]],
                       node_env: tuple[dict, dict] = ({}, {})) -> list[str]:
    """Run ``plan run PLAN --tokens 5,6,7,8 -n 4 ARGS`` as two torchrun nodes (each its own PLAN and ARGS), which
    must end with code 2: each node's one ``error:`` line, after checking that neither rank printed a
    traceback of its own (torchrun's report of the exit follows them). The heartbeat window is set
    past the subprocess timeout: a run that waited for it, or hung, fails by that timeout."""
    plan_exe = _plan_exe()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SHIFTPLAN_SILENT_S": "600"}
    plans = plans if isinstance(plans, tuple) else (plans, plans)
    procs = [subprocess.Popen(_node(k, port, plan_exe, "run", str(plans[k]), "--tokens", "5,6,7,8", "-n", "4",
                                    *node_args[k]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **node_env[k]},
                              cwd=tmp_path)
             for k in (0, 1)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    lines = []
    for err in errs:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        assert "(exitcode: 2)" in err, err[-3000:]  # torchrun's report of its rank's exit
        assert "Traceback" not in err[:err.index("(exitcode: 2)")], err[-3000:]
        lines.append(errors[0])
    assert all(p.returncode != 0 for p in procs)
    return lines


def test_a_rank_that_fails_ends_the_run_naming_its_error(tmp_path: Path) -> None:
    """Two torchrun nodes (pp2 across them); node 1's copy of the checkpoint lacks the final norm, which
    its stage (the last) loads. Its rank fails building the stage; both nodes print the same one
    ``error:`` line, naming rank 1, its node and the missing tensor, and exit with code 2, rather
    than naming a rank that stopped beating."""
    from safetensors.torch import load_file, save_file

    from tests.tiny.helpers import save_checkpoint

    good, bad = tmp_path / "good", tmp_path / "bad"
    save_checkpoint("qwen2", good)
    shutil.copytree(good, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    path = _two_node_plan(make_plan("qwen2", pp=2), tmp_path)
    for line in _two_nodes_stopped(tmp_path, path, (["--weights", str(good)], ["--weights", str(bad)])):
        assert line.startswith("error: worker rank 1 on node 1 "), line
        assert "failed: weights in " in line and "'model.norm.weight' not found" in line, line


@pytest.mark.parametrize("differs", ["seed", "plan"])
def test_nodes_launched_differently_are_stopped_naming_the_difference(tmp_path: Path, differs: str) -> None:
    """Node 1 launched with another ``--seed`` (its random weights, and so the tokens, would differ)
    or another revision of the plan file (more sequences a step): both nodes stop with one line naming
    rank 1, its node and the difference from rank 0, before any stage is built."""
    plan = make_plan("qwen2", pp=2)
    path = _two_node_plan(plan, tmp_path)
    if differs == "seed":
        plans, args, want = (path, path), ([], ["--seed", "3"]), "--seed: 3 there, 0 on rank 0"
    else:
        (tmp_path / "other").mkdir()
        sched = plan.scheduler.model_copy(update={"max_seqs": plan.scheduler.max_seqs + 1})
        other = _two_node_plan(plan.model_copy(update={"scheduler": sched}), tmp_path / "other")
        plans, args = (path, other), ([], [])
        want = f"plan.scheduler.max_seqs: {plan.scheduler.max_seqs + 1} there, {plan.scheduler.max_seqs} on rank 0"
    for line in _two_nodes_stopped(tmp_path, plans, args):
        assert line.startswith("error: rank 1 on node 1 ") and "launched with another plan or options" in line, line
        assert want in line, line


def test_a_node_that_fails_before_joining_is_named_not_waited_for(tmp_path: Path) -> None:
    """Node 1 is launched with an image for this text-only plan: `plan run`'s checks refuse it before
    its rank joins the process group. Node 1 prints that error; node 0's rank, waiting for it to join,
    prints one line naming rank 1 and the same error, and both exit with code 2, rather than node 0
    waiting out the rendezvous (30 minutes for gloo)."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = _two_node_plan(make_plan("qwen2", pp=2), tmp_path)
    lines = _two_nodes_stopped(tmp_path, path, ([], ["--image", str(tmp_path / "a.png")]))
    assert "has no vision tower" in lines[1] and not lines[1].startswith("error: rank"), lines[1]
    assert lines[0].startswith("error: rank 1 on node 1 ") and "failed: --image: " in lines[0], lines[0]
    assert "has no vision tower; every rank stops" in lines[0], lines[0]


def test_ranks_that_do_not_all_join_stop_after_the_join_window(tmp_path: Path) -> None:
    """One rank of two counts itself in (``liveness.wait_for_peers``) and the other never comes (it died
    before joining, saying nothing): after ``SHIFTPLAN_JOIN_S`` (1 s here) the rank exits with code 2
    and one line saying how many joined, rather than waiting for ever."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # torchrun's, in its launcher
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "SHIFTPLAN_JOIN_S": "1"}
    proc = subprocess.run([sys.executable, "-c", "from executors.liveness import wait_for_peers; wait_for_peers(2)"],
                          capture_output=True, text=True, timeout=60, env=env)
    del store
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: 1 of 2 ranks joined within 1 s (SHIFTPLAN_JOIN_S): a rank died before "
                                   "joining, see its node's output; every rank stops"), proc.stderr[-2000:]


def test_a_rank_stuck_while_beating_is_found_by_rank_0s_wait(tmp_path: Path) -> None:
    """Node 1's rank (pp2's last stage) never finishes a step but its heartbeat goes on, as a rank stuck
    in a kernel spinning on a peer's flag would (here a ``sitecustomize`` on node 1 only makes its
    ``RankRunner.run`` sleep for ever). After ``SHIFTPLAN_STEP_TIMEOUT_S`` (3 s here) of rank 0 waiting,
    both nodes print one line saying so and exit with code 2."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import time\n"
        "    import executors.worker\n"
        "    def _stuck(self, step):\n"
        "        while True:\n"
        "            time.sleep(1)\n"
        "    executors.worker.RankRunner.run = _stuck\n")
    path = _two_node_plan(make_plan("qwen2", pp=2), tmp_path)
    lines = _two_nodes_stopped(tmp_path, path, ([], []), ({"SHIFTPLAN_STEP_TIMEOUT_S": "3"},
                               {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}))
    for line in lines:
        assert line.startswith("error: rank 0 waited ") and "though every rank beats: a rank is stuck" in line, line
