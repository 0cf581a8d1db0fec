"""Point 1: a plan compiled by the planner (hardware cpu, mesh pinned in the spec's search) runs on
CPU ranks and matches HF transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import executors
from executors import Request, Sampling
from planner.api import compile_spec
from plans.schema import save_plan
from tests.tiny.helpers import CONFIGS, IMAGE_TOKEN, check_against_oracle, random_image, save_checkpoint

SPEC = """\
name: tiny-qwen2-vl-cpu-shift
model:
  config: qwen2_vl.json
  weights_dtype: fp32
  kv_dtype: fp32
hardware:
  gpu: cpu
  gpus_per_node: 4
  nodes: 1
workload:
  arrival_rate: 1.0
  input_tokens: {mean: 32, max: 128}
  output_tokens: {mean: 16, max: 64}
  images: {per_request: [0, 1], weights: [0.5, 0.5], resolution: [[112, 112]]}
objective: max_throughput
search:
  tp: [2]
  sp: [2]
  pp: [1]
  dp: [1]
  shift_threshold: 8
  max_batch_tokens: 16
  max_seqs: 8
"""


def test_compiled_cpu_plan_runs_and_matches_hf(tmp_path: Path) -> None:
    shutil.copy(CONFIGS["qwen2_vl"], tmp_path / "qwen2_vl.json")
    (tmp_path / "tiny.yaml").write_text(SPEC)
    plan = compile_spec(tmp_path / "tiny.yaml")
    assert (plan.mesh.tp, plan.mesh.sp, plan.shift.enabled, plan.shift.threshold_tokens) == (2, 2, True, 8)
    save_plan(plan, tmp_path / "tiny.plan.yaml")
    oracle = save_checkpoint("qwen2_vl", tmp_path / "w", seed=12)
    img = random_image((4, 6), 3)
    reqs = [Request(tokens=[118, IMAGE_TOKEN, 119, 20, 21, 22], images=[img]), Request(tokens=list(range(40, 61)))]
    with executors.load(tmp_path / "tiny.plan.yaml", weights=tmp_path / "w", keep_logits=True) as eng:
        results = eng.generate(reqs, max_new_tokens=16, sampling=Sampling(stop_on_eos=False))
        assert eng.mode_counts["tp"] > 0 and eng.mode_counts["sp_tp"] > 0
    for req, res, im in zip(reqs, results, [[img], None]):
        assert res.error is None, res.error
        assert check_against_oracle(oracle, req.tokens, res, im) < 1e-4


def _spec(name: str, gpus: int, search: str) -> str:
    head = SPEC.split("search:")[0].replace("tiny-qwen2-vl-cpu-shift", name).replace("gpus_per_node: 4",
                                                                                   f"gpus_per_node: {gpus}")
    return head + "search:\n" + search


def test_compiled_encoder_placements_run_and_match_hf(tmp_path: Path) -> None:
    """The planner's own plans for the encoder beyond stage 0: pp2 with ``all_dp`` (both stages
    encode) and tp2 + one dedicated encoder GPU (3 ranks)."""
    shutil.copy(CONFIGS["qwen2_vl"], tmp_path / "qwen2_vl.json")
    oracle = save_checkpoint("qwen2_vl", tmp_path / "w", seed=13)
    specs = {
        "all-dp": (2, "  pp: [2]\n  tp: [1]\n  sp: [1]\n  dp: [1]\n  vision_placement: [all_dp]\n  max_batch_tokens: 16\n"),
        "dedicated": (3, "  pp: [1]\n  tp: [2]\n  sp: [1]\n  dp: [1]\n  vision_placement: [dedicated]\n"
                         "  dedicated_vision_gpus: [1]\n  max_batch_tokens: 16\n"),
    }
    img = random_image((4, 4), 5)
    reqs = [Request(tokens=[118, IMAGE_TOKEN, 119, 20, 21], images=[img]), Request(tokens=list(range(40, 52)))]
    for name, (gpus, search) in specs.items():
        (tmp_path / f"{name}.yaml").write_text(_spec(name, gpus, search))
        plan = compile_spec(tmp_path / f"{name}.yaml")
        assert plan.vision.placement == name.replace("-", "_")
        save_plan(plan, tmp_path / f"{name}.plan.yaml")
        with executors.load(tmp_path / f"{name}.plan.yaml", weights=tmp_path / "w", keep_logits=True) as eng:
            results = eng.generate(reqs, max_new_tokens=8, sampling=Sampling(stop_on_eos=False))
            assert len(eng.pids) == gpus
        for req, res, im in zip(reqs, results, [[img], None]):
            assert res.error is None, res.error
            assert check_against_oracle(oracle, req.tokens, res, im) < 1e-4
