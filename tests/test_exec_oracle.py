"""Point 6: every mesh gives HF transformers' logits (fp32, 1e-4 relative) and greedy tokens.

One engine launch per (model, mesh) runs a batch mixing prompt lengths (one long enough for a
chunked prefill under the 16-token budget), text-only and image+text requests, for 32 new tokens;
shift meshes see prefill steps above the 8-token threshold (SP x TP) and decode steps below (TP).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import executors
from executors import Request, Sampling
from tests.tiny.helpers import IMAGE_TOKEN, check_against_oracle, make_plan, random_image, save_checkpoint

MESHES = {
    "tp2": dict(tp=2),
    "sp2": dict(sp=2),
    "shift-sp2": dict(sp=2, shift=True, threshold=8),
    "shift-sp2xtp2": dict(sp=2, tp=2, shift=True, threshold=8),
    "pp2": dict(pp=2, microbatches=2),
    "pp2xtp2": dict(pp=2, tp=2),
    "dp2": dict(dp=2),
}
MODELS = ["llama", "qwen2", "qwen2_vl"]
NEW_TOKENS = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    for name in MODELS:
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, save_checkpoint(name, d, seed=7))
    return out


def batch(name: str) -> tuple[list[Request], list[list | None]]:
    reqs = [Request(tokens=[5, 9, 17]), Request(tokens=list(range(30, 59))), Request(tokens=[3, 4, 11, 12, 40, 41, 42])]
    imgs: list[list | None] = [None, None, None]
    if name == "qwen2_vl":
        a, b = random_image((4, 4), 1), random_image((4, 6), 2)
        reqs += [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[a]),
                 Request(tokens=[118, IMAGE_TOKEN, 119, 60, 61, 118, IMAGE_TOKEN, 119, 62], images=[b, a])]
        imgs += [[a], [b, a]]
    return reqs, imgs


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name", MODELS)
def test_mesh_matches_hf(name: str, mesh: str, checkpoints: dict) -> None:
    ckpt, oracle = checkpoints[name]
    plan = make_plan(name, max_batch_tokens=16, **MESHES[mesh])
    reqs, imgs = batch(name)
    with executors.load(plan, weights=ckpt, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=NEW_TOKENS, sampling=Sampling(stop_on_eos=False))
        modes = dict(eng.mode_counts)
        # every replica's reporting rank told its graph captures with its steps: none on CPU ranks
        assert set(eng.rank_graphs) == set(range(plan.mesh.dp)) and eng.graph_captures() is None
    for req, res, im in zip(reqs, results, imgs):
        assert res.error is None, res.error
        assert len(res.tokens) == NEW_TOKENS
        rel = check_against_oracle(oracle, req.tokens, res, im)
        assert rel < TOL, f"{name} {mesh}: relative logit error {rel:.2e}"
    if MESHES[mesh].get("shift"):
        assert modes["sp_tp"] > 0 and modes["tp"] > 0, modes  # both sides of the threshold ran
    elif MESHES[mesh].get("sp", 1) > 1:
        assert modes["tp"] == 0 and modes["sp_tp"] > 0, modes


@pytest.mark.parametrize("mesh", ["single", "tp2", "shift-sp2xtp2", "pp2xtp2"])
def test_llama_biases_match_hf(mesh: str, tmp_path: Path) -> None:
    """Llama's ``attention_bias`` (QKV and o) and ``mlp_bias`` (gate, up, down), random nonzero biases:
    the row-parallel products' biases are added once, after their all-reduce. (The engine had read QKV's
    bias only, and ran such a checkpoint without the others, silently.)"""
    oracle = save_checkpoint("llama_bias", tmp_path, seed=7)
    assert any(n.endswith("o_proj.bias") for n, _ in oracle.named_parameters())
    plan = make_plan("llama_bias", max_batch_tokens=16, **MESHES.get(mesh, {}))
    reqs, _ = batch("llama_bias")
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=8, sampling=Sampling(stop_on_eos=False))
    for req, res in zip(reqs, results):
        assert res.error is None, res.error
        rel = check_against_oracle(oracle, req.tokens, res)
        assert rel < TOL, f"llama_bias {mesh}: relative logit error {rel:.2e}"


PLACEMENTS = {  # the vision encoder beyond stage 0's GPUs
    "pp2-all_dp": dict(pp=2, placement="all_dp"),
    "pp2xtp2-all_dp": dict(pp=2, tp=2, placement="all_dp"),
    "tp2-dedicated1": dict(tp=2, placement="dedicated", dedicated=1),
    "pp2-dedicated2": dict(pp=2, placement="dedicated", dedicated=2),
    "dp2-dedicated1": dict(dp=2, placement="dedicated", dedicated=1),
    "shift-sp2xtp2-dedicated1": dict(sp=2, tp=2, shift=True, threshold=8, placement="dedicated", dedicated=1),
}


@pytest.mark.parametrize("mesh", list(PLACEMENTS))
def test_encoder_placement_matches_hf(mesh: str, checkpoints: dict) -> None:
    """all_dp: every GPU of the replica (both stages) holds the tower and encodes a share;
    dedicated: encoder ranks beside the mesh encode and send the embeddings to stage 0."""
    ckpt, oracle = checkpoints["qwen2_vl"]
    kw = PLACEMENTS[mesh]
    plan = make_plan("qwen2_vl", max_batch_tokens=16, **kw)
    reqs, imgs = batch("qwen2_vl")
    with executors.load(plan, weights=ckpt, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=NEW_TOKENS, sampling=Sampling(stop_on_eos=False))
        assert len(eng.pids) == plan.mesh.size + kw.get("dedicated", 0)
        encoded = sum(eng.encoder_jobs)
    assert encoded == (2 if kw.get("dedicated") else 0)  # the two image requests, once each
    for req, res, im in zip(reqs, results, imgs):
        assert res.error is None, res.error
        assert check_against_oracle(oracle, req.tokens, res, im) < TOL


def test_mistral_one_kv_head_replicated_shift(checkpoints: dict, tmp_path: Path) -> None:
    """Mistral with a single KV head on shift(sp2 x tp2): the KV head is replicated on all 4 GPUs."""
    oracle = save_checkpoint("mistral", tmp_path, seed=4)
    plan = make_plan("mistral", sp=2, tp=2, shift=True, threshold=8, max_batch_tokens=16)
    reqs = [Request(tokens=[5, 9, 17]), Request(tokens=list(range(30, 52)))]
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=NEW_TOKENS, sampling=Sampling(stop_on_eos=False))
    for req, res in zip(reqs, results):
        assert check_against_oracle(oracle, req.tokens, res) < TOL


@pytest.mark.parametrize("mesh", ["shift-sp2xtp2", "pp2xtp2"])
def test_qwen2_5_vl_window_attention(mesh: str, tmp_path: Path) -> None:
    """Qwen2.5-VL (RMSNorm + SwiGLU vision blocks, window attention with one full-attention block):
    an 8x12-patch image spans several 2x2-token windows."""
    oracle = save_checkpoint("qwen2_5_vl", tmp_path, seed=6)
    plan = make_plan("qwen2_5_vl", max_batch_tokens=16, **MESHES[mesh])
    big, small = random_image((8, 12), 3), random_image((4, 4), 4)
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[big]), Request(tokens=[3, 4, 5, 6]),
            Request(tokens=[118, IMAGE_TOKEN, 119, 50], images=[small])]
    imgs = [[big], None, [small]]
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=NEW_TOKENS, sampling=Sampling(stop_on_eos=False))
    for req, res, im in zip(reqs, results, imgs):
        assert res.error is None, res.error
        assert check_against_oracle(oracle, req.tokens, res, im) < TOL


@pytest.mark.parametrize("name,mesh", [("qwen2_vl", "tp2"), ("qwen2_5_vl", "shift-sp2")])
def test_vision_tower_tp_sharded(name: str, mesh: str, tmp_path: Path) -> None:
    """Placement stage0_tp: the vision blocks are split over the stage's 2 GPUs (heads, MLP columns)."""
    oracle = save_checkpoint(name, tmp_path, seed=8)
    plan = make_plan(name, max_batch_tokens=16, placement="stage0_tp", **MESHES[mesh])
    img = random_image((8, 12), 5)
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[img]), Request(tokens=[3, 4, 5])]
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=8, sampling=Sampling(stop_on_eos=False))
        assert eng.local is None and len(eng.pids) == 2
    for req, res, im in zip(reqs, results, [[img], None]):
        assert res.error is None, res.error
        assert check_against_oracle(oracle, req.tokens, res, im) < TOL


def test_per_stage_shift_thresholds(checkpoints: dict) -> None:
    """pp2 x sp2 with shift: stage 0 always shifts to TP (threshold 1000), stage 1 never (0)."""
    ckpt, oracle = checkpoints["qwen2"]
    plan = make_plan("qwen2", pp=2, sp=2, shift=True, threshold=8, max_batch_tokens=16)
    plan.stages[0].shift_threshold_tokens = 1000
    plan.stages[1].shift_threshold_tokens = 0
    reqs, _ = batch("qwen2")
    with executors.load(plan, weights=ckpt, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(reqs, max_new_tokens=8, sampling=Sampling(stop_on_eos=False))
        modes = dict(eng.mode_counts)
    assert modes["tp"] == modes["sp_tp"] > 0  # one of each per micro-batch
    for req, res in zip(reqs, results):
        assert check_against_oracle(oracle, req.tokens, res) < TOL
