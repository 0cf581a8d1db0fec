"""Point 8: a worker that dies or fails stops every rank quickly with that rank's error."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import executors
from executors import Request, Sampling
from executors.engine import WorkerError
from plans.errors import UserError
from tests.tiny.helpers import CONFIGS, make_plan, save_checkpoint


def _gone(pids: list[int], within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_killed_rank_stops_all_ranks(tmp_path: Path) -> None:
    save_checkpoint("llama", tmp_path)
    plan = make_plan("llama", pp=2, tp=2)
    eng = executors.load(plan, weights=tmp_path, kv_blocks=64)
    pids = eng.pids
    assert len(pids) == 4 and not _gone(pids, within=0.2)  # all four ranks up
    killer = threading.Timer(1.0, os.kill, args=(pids[2], signal.SIGKILL))
    t0 = time.monotonic()
    killer.start()
    with pytest.raises(WorkerError) as err:
        eng.generate([Request(tokens=[3, 4, 5])] * 2, max_new_tokens=200, sampling=Sampling(stop_on_eos=False))
    elapsed = time.monotonic() - t0
    killer.join()
    assert "rank 2 died (signal 9)" in str(err.value)
    assert elapsed < 30.0
    assert _gone(pids), "worker processes left behind"


def test_killed_encoder_rank_stops_all_ranks(tmp_path: Path) -> None:
    """A dedicated encoder rank dies while image requests wait for it: the engine names it."""
    from tests.tiny.helpers import IMAGE_TOKEN, random_image

    plan = make_plan("qwen2_vl", tp=2, placement="dedicated", dedicated=1)
    eng = executors.load(plan, kv_blocks=64)
    pids = eng.pids
    assert len(pids) == 3
    os.kill(pids[2], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        eng.generate([Request(tokens=[IMAGE_TOKEN, 5], images=[random_image((4, 4), 1)])], max_new_tokens=4)
    assert "encoder rank 2 died (signal 9)" in str(err.value)
    assert time.monotonic() - t0 < 30.0
    assert _gone(pids), "worker processes left behind"


def test_cuda_without_gpus_is_a_user_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(UserError, match=r"needs 2 GPU\(s\) on this node; 0 visible"):
        executors.load(make_plan("llama", tp=2), device="cuda")


def test_mesh_that_cannot_split_heads_fails_before_starting() -> None:
    with pytest.raises(UserError, match=r"4 query heads are not divisible by tp\*sp = 4\*2 = 8"):
        executors.load(make_plan("llama", tp=4, sp=2))


def test_plan_without_the_configs_vision_tower_fails_before_starting() -> None:
    plan = make_plan("qwen2_vl", placement="none")
    text_only = plan.model_copy(update={"model": plan.model.model_copy(update={"vision_blocks": 0}),
                                        "stages": [s.model_copy(update={"vision": False}) for s in plan.stages]})
    with pytest.raises(UserError, match="model.vision_blocks = 0 but the model config's vision tower has 2 blocks"):
        executors.load(text_only)


def test_failing_rank_reports_its_error(tmp_path: Path) -> None:
    """Stage 1's checkpoint slice is missing: rank 1 fails at load, rank 0 is stopped too."""
    save_checkpoint("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.3.mlp.down_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    plan = make_plan("llama", pp=2)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        executors.load(plan, weights=tmp_path)
    msg = str(err.value)
    assert "worker rank 1 failed" in msg and "model.layers.3.mlp.down_proj.weight" in msg
    assert "Traceback" not in msg and "Traceback" in err.value.details  # clean message, details kept
    assert time.monotonic() - t0 < 30.0


@pytest.mark.parametrize("mesh", [{}, {"tp": 2}, {"pp": 2}], ids=["single", "tp2", "pp2"])
def test_a_checkpoint_of_another_size_is_refused(tmp_path: Path, mesh: dict) -> None:
    """The same architecture with an MLP twice as wide: each rank's runs lie inside the larger tensors,
    so only the whole tensors' shapes tell; the load names the tensors and both shapes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tiny.helpers import config

    cfg = {k: v for k, v in config("qwen2").items() if k not in ("architectures", "model_type")}
    cfg["intermediate_size"] *= 2
    Qwen2ForCausalLM(Qwen2Config(**cfg)).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").unlink()  # its config would tell first (the next test): the tensors alone
    with pytest.raises(UserError) as err:
        executors.load(make_plan("qwen2", **mesh), weights=tmp_path)
    msg = str(err.value)
    gate = 2 * config("qwen2")["intermediate_size"]
    assert "mlp.gate_proj.weight" in msg and f"where the model config gives ({gate}, " in msg, msg
    assert "another model or size" in msg


@pytest.mark.parametrize("edit", ["rope", "eps"])
def test_a_checkpoint_whose_config_is_another_models_is_refused(tmp_path: Path, edit: str) -> None:
    """Same tensor shapes, another model: the checkpoint's config.json has Llama 3's rope (no llama3
    scaling, as in Llama 3 against 3.1) or another norm epsilon. The load would run and give other
    tokens; it is refused before any rank starts, naming what differs. The unedited checkpoint runs."""
    import json

    save_checkpoint("llama", tmp_path)
    plan = make_plan("llama", tp=2)
    with executors.load(plan, weights=tmp_path) as eng:
        eng.generate([Request(tokens=[1, 2, 3])], max_new_tokens=1, sampling=Sampling())
    cfg = json.loads((tmp_path / "config.json").read_text())
    if edit == "rope":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    else:
        cfg["rms_norm_eps"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        executors.load(plan, weights=tmp_path)
    msg = str(err.value)
    assert "its config.json describes another model than plan" in msg, msg
    assert ("rope frequencies" in msg) == (edit == "rope") and ("rms_norm_eps: 1e-06 here" in msg) == (edit == "eps")
    assert not isinstance(err.value, WorkerError)  # found before any rank started


def test_an_unknown_backend_is_refused_before_any_worker_starts(monkeypatch) -> None:
    """``load(..., backend=...)`` names a backend it does not know before it spawns a rank (a rank would
    refuse it only after building its stage)."""
    from executors.engine import Engine

    def spawned(self) -> None:
        raise AssertionError("workers were spawned")

    monkeypatch.setattr(Engine, "_spawn", spawned)
    with pytest.raises(UserError, match="unknown backend 'jax'; choose one of eager, compile, tensorrt"):
        executors.load(make_plan("llama", tp=2), backend="jax")


def _group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` (the driver, its ranks, multiprocessing's helpers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_a_driver_that_ends_takes_its_ranks_with_it(tmp_path: Path, sig: str) -> None:
    """`plan bench` on a pp2 plan, its driver killed (SIGKILL: no cleanup runs) or terminated (SIGTERM,
    as a job scheduler cancels a run) mid-run: no rank, nor multiprocessing's helpers, outlives it (each
    rank checks on its driver while it waits for a step: ``worker.exit_if_driver_gone``), and SIGTERM
    exits with code 143 after stopping the ranks. An orphan fails the test after 30 s."""
    import json
    import subprocess
    import sys

    from plans.schema import save_plan
    from tests.tiny.helpers import CONFIGS

    cfg = json.loads(CONFIGS["qwen2"].read_text())
    cfg["max_position_embeddings"] = 8192
    (tmp_path / "long.json").write_text(json.dumps(cfg))
    base = make_plan("qwen2", pp=2)
    save_plan(base.model_copy(update={"model": base.model.model_copy(update={"config": str(tmp_path / "long.json")})}),
              tmp_path / "p.plan.yaml")
    plan_exe = Path(sys.executable).parent / "plan"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([str(plan_exe), "bench", str(tmp_path / "p.plan.yaml"), "--requests", "8", "--input-tokens",
                             "16", "--output-tokens", "4000"], stdout=subprocess.DEVNULL, stderr=(tmp_path / "err").open("w"),
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    try:
        end = time.monotonic() + 120
        while len(_group(proc.pid)) < 5 and time.monotonic() < end:  # driver, tracker, forkserver, 2 ranks
            time.sleep(0.2)
        assert len(_group(proc.pid)) >= 5, "the ranks did not start"
        time.sleep(3.0)  # serving
        os.kill(proc.pid, getattr(signal, f"SIG{sig}"))
        proc.wait(timeout=60)  # (a file, not a pipe, takes stderr: an orphan would hold a pipe open)
        end = time.monotonic() + 30
        while _group(proc.pid) and time.monotonic() < end:
            time.sleep(0.2)
        left = _group(proc.pid)
    finally:
        for pid in _group(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the driver: {left}"
    if sig == "TERM":
        err = (tmp_path / "err").read_text()
        assert proc.returncode == 143 and err.strip().endswith("terminated"), err[-2000:]


def test_a_stuck_rank_is_named_and_every_rank_stopped(monkeypatch, tmp_path: Path) -> None:
    """A rank that stays alive but answers nothing (stopped by SIGSTOP here; on GPUs, a kernel spinning
    on a peer's flag) mid-run: after ``SHIFTPLAN_STEP_TIMEOUT_S`` (2 s here) without an answer the
    driver stops every rank and raises, naming the stopped rank. A watchdog kills the rank after 60 s,
    so an engine that waited for ever fails this test rather than hanging it."""
    import json

    from tests.tiny.helpers import CONFIGS

    monkeypatch.setenv("SHIFTPLAN_STEP_TIMEOUT_S", "2")
    cfg = json.loads(CONFIGS["llama"].read_text())
    cfg["max_position_embeddings"] = 4096  # a run of many seconds: the rank is stopped mid-run
    (tmp_path / "long.json").write_text(json.dumps(cfg))
    base = make_plan("llama", tp=2)
    eng = executors.load(base.model_copy(update={"model": base.model.model_copy(update={"config": str(tmp_path / "long.json")})}))
    pid = eng.procs[1].pid
    watchdog = threading.Timer(60.0, lambda: os.kill(pid, signal.SIGKILL))
    threading.Timer(1.0, lambda: os.kill(pid, signal.SIGSTOP)).start()
    watchdog.start()
    try:
        with pytest.raises(WorkerError) as err:
            eng.generate([Request(tokens=[1, 2, 3])], max_new_tokens=3000, sampling=Sampling())
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        eng.shutdown(force=True)
    msg = str(err.value)
    assert "no step answered for" in msg and "worker rank 1 is stopped" in msg, msg
    assert _gone([p.pid for p in eng.procs])


def test_sigterm_ends_the_run_even_when_unwinding_waits() -> None:
    """SIGTERM unwinds (the ranks are stopped politely); if that waits (here: for ever), the CLI's
    handler still exits with 143 after ``cli.TERM_GRACE_S`` (1 s here), saying so."""
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from planner import cli\n"
            "cli.TERM_GRACE_S = 1.0\n"
            "signal.signal(signal.SIGTERM, cli._terminate)\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n"
            "except cli.Terminated:\n"
            "    time.sleep(60)  # a shutdown that never ends\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "terminated (the run did not end within 1 s of SIGTERM)" in proc.stderr


def test_a_sliding_window_shorter_than_the_context_is_refused(tmp_path: Path) -> None:
    """A Mistral config with a 16-token sliding window: the executor attends over the whole context,
    which agrees with the window only up to 16 tokens. Serving more is refused before any rank starts,
    naming the window and the --max-context that serves it; at that context the engine matches HF."""
    import json

    from tests.tiny.helpers import check_against_oracle, hf_model

    cfg = json.loads(CONFIGS["mistral"].read_text())
    cfg["sliding_window"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = make_plan("mistral")
    plan = base.model_copy(update={"model": base.model.model_copy(update={"config": str(tmp_path / "config.json")})})
    with pytest.raises(UserError, match=r"sliding window of 16 tokens.*--max-context 16"):
        executors.load(plan)
    oracle = hf_model("mistral", seed=3)  # the same weights under the windowed config
    oracle.config.sliding_window = 16
    oracle.save_pretrained(str(tmp_path))
    with executors.load(plan, weights=tmp_path, keep_logits=True, max_context=16) as eng:
        res = eng.generate([Request(tokens=[5, 9, 17, 30])], max_new_tokens=12, sampling=Sampling(stop_on_eos=False))[0]
    assert res.error is None, res.error
    assert check_against_oracle(oracle, [5, 9, 17, 30], res) < 1e-4
