"""The model tree is built on the meta device and the parallelize step's tables give each rank the
shards the mesh arithmetic says (tiny Llama: H = 4 query heads, KV = 2, D = 16, hidden 64,
I = 128, V = 128); loading then fills exactly those shapes."""

from __future__ import annotations

import pytest
import torch

from executors.config import model_args
from executors.layers import Linear, load
from executors.model import Transformer, checkpoint_shapes
from executors.parallel import Par
from executors.parallelize import UlyssesCore, parallelize
from executors.weights import RandomSource
from tests.tiny.helpers import config, make_plan


def _meta(name: str = "llama") -> Transformer:
    a = model_args(config(name))
    with torch.device("meta"):
        return Transformer(a)


def _shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_built_on_meta_until_loaded() -> None:
    """Every parameter is on meta through construction and parallelize (only the rotary
    frequencies, computed from the config, are real); ``load`` replaces all of them."""
    model = _meta()
    assert all(p.is_meta for p in model.parameters())
    assert len(model.layers) == 4 and model.embed is not None and model.lm_head is not None
    plan = make_plan("llama")
    parallelize(model, plan, plan.stages[0], Par())
    assert all(p.is_meta for p in model.parameters())
    assert [n for n, b in model.named_buffers() if not b.is_meta] == ["freq"]
    want = _shapes(model)
    a = model.a
    load(model, RandomSource(checkpoint_shapes(a), seed=0), torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    assert _shapes(model) == want
    assert want["layers.0.layouts.tp.attn.qkv.weight"] == ((4 + 2 * 2) * 16, 64)


@pytest.mark.parametrize("r", [0, 1])
def test_tp2_shards(r: int) -> None:
    """TP of degree 2: rank r computes query heads ``[2r, 2r+2)`` and KV head r, MLP rows
    ``[64r, 64r+64)``, vocab rows ``[64r, 64r+64)``; o and down are row-parallel."""
    plan = make_plan("llama", tp=2)
    model = parallelize(_meta(), plan, plan.stages[0], Par(tp=2, tp_i=r))
    s = _shapes(model)
    assert list(model.layers["0"].layouts) == ["tp"]
    p = "layers.0.layouts.tp."
    assert s[p + "attn.qkv.weight"] == ((2 + 2 * 1) * 16, 64)
    assert s[p + "attn.o.weight"] == (64, 2 * 16)
    assert s[p + "mlp.gate_up.weight"] == (2 * 64, 64)
    assert s[p + "mlp.down.weight"] == (64, 64)
    assert s["embed.weight"] == s["lm_head.weight"] == (64, 64)
    assert s["layers.0.input_layernorm.weight"] == s["norm.weight"] == (64,)
    qkv = model.layers["0"].layouts["tp"].attn.qkv
    assert qkv.take == ([(32 * r, 32 * r + 32)], [(16 * r, 16 * r + 16)], [(16 * r, 16 * r + 16)]) and qkv.dim == 0
    down = model.layers["0"].layouts["tp"].mlp.down
    assert down.take == ([(64 * r, 64 * r + 64)],) and down.dim == 1
    assert model.embed.lo == 64 * r
    attn = model.layers["0"].layouts["tp"].attn
    assert (attn.nq, attn.nkv) == (2, 1) and attn.core.kv_of_q is None


@pytest.mark.parametrize("r", [0, 1])
def test_sp2_shift_holds_both_layouts(r: int) -> None:
    """sp2 with shift: the TP layout is W/2 (as tp2 above), the SP x TP layout W/tp = W (all heads,
    attention wrapped in the Ulysses all-to-alls)."""
    plan = make_plan("llama", sp=2, shift=True, threshold=8)
    model = parallelize(_meta(), plan, plan.stages[0], Par(sp=2, sp_i=r))
    s = _shapes(model)
    assert set(model.layers["0"].layouts) == {"tp", "sp_tp"}
    tp, sptp = "layers.0.layouts.tp.", "layers.0.layouts.sp_tp."
    assert s[tp + "attn.qkv.weight"] == ((2 + 2 * 1) * 16, 64) and s[tp + "mlp.down.weight"] == (64, 64)
    assert s[sptp + "attn.qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert s[sptp + "attn.o.weight"] == (64, 64)
    assert s[sptp + "mlp.gate_up.weight"] == (2 * 128, 64) and s[sptp + "mlp.down.weight"] == (64, 128)
    assert isinstance(model.layers["0"].layouts["sp_tp"].attn.core, UlyssesCore)
    assert not isinstance(model.layers["0"].layouts["tp"].attn.core, UlyssesCore)
    assert s["embed.weight"] == (64, 64)
    cache_heads = model.layers["0"].layouts["tp"].attn.nkv  # what one shared KV cache holds per GPU
    assert cache_heads == model.layers["0"].layouts["sp_tp"].attn.nkv // 2 == 1


def test_sp2_tp2_shift_replicates_the_one_kv_head() -> None:
    """Mistral's single KV head over P = 4: each rank's TP layout holds it once; its SP x TP layout
    (query heads of shift ranks 2 tp_i, 2 tp_i + 1) reads it twice, one copy per sp rank."""
    plan = make_plan("mistral", tp=2, sp=2, shift=True, threshold=8)
    model = parallelize(_meta("mistral"), plan, plan.stages[0], Par(tp=2, sp=2, tp_i=1, sp_i=0))
    lay = model.layers["0"].layouts
    assert tuple(lay["tp"].attn.qkv.weight.shape) == ((1 + 2 * 1) * 16, 64)
    assert tuple(lay["sp_tp"].attn.qkv.weight.shape) == ((2 + 2 * 2) * 16, 64)
    assert lay["sp_tp"].attn.qkv.take[1] == [(0, 16), (0, 16)]
    assert lay["tp"].attn.qkv.take[0] == [(32, 48)]  # shift rank 2: query head 2


def test_pp_cut_keeps_the_stage() -> None:
    plan = make_plan("llama", pp=2)
    first = parallelize(_meta(), plan, plan.stages[0], Par(pp=2))
    last = parallelize(_meta(), plan, plan.stages[1], Par(pp=2, pp_i=1))
    assert list(first.layers) == ["0", "1"] and first.lm_head is None and first.norm is None
    assert list(last.layers) == ["2", "3"] and last.embed is None and last.lm_head is not None
    assert all(isinstance(m, Linear) for m in (last.layers["2"].layouts["tp"].mlp.down,))


def test_vision_tower_tp2_shards() -> None:
    """The tower's table over 2 GPUs: rank 1 holds heads [nh, 2 nh) of q, k and v (three row runs
    of the stacked qkv), MLP columns [F/2, F); the merger and patch embedding stay whole."""
    from executors.vision import VisionTower
    from executors.parallelize import parallelize_tower

    v = model_args(config("qwen2_vl")).vision
    E, Fd, hd = v.embed_dim, v.mlp_dim, v.embed_dim // v.num_heads
    with torch.device("meta"):
        tower = VisionTower(v)
    whole = _shapes(tower)
    parallelize_tower(tower, None, 1, 2)
    s = _shapes(tower)
    assert all(p.is_meta for p in tower.parameters())
    nh = v.num_heads // 2
    b = tower.blocks[0]
    assert s["blocks.0.attn.qkv.weight"] == (3 * E // 2, E) and s["blocks.0.attn.qkv.bias"] == (3 * E // 2,)
    assert b.attn.qkv.take == ([(j * E + nh * hd, j * E + 2 * nh * hd) for j in range(3)],)
    assert s["blocks.0.attn.proj.weight"] == (E, E // 2) and s["blocks.0.attn.proj.bias"] == (E,)
    assert s["blocks.0.mlp.fc1.weight"] == (Fd // 2, E) and s["blocks.0.mlp.fc2.weight"] == (E, Fd // 2)
    assert b.attn.heads == nh
    assert {k: s[k] for k in s if not k.startswith("blocks.")} == {k: whole[k] for k in whole if not k.startswith("blocks.")}


def test_one_shot_all_reduce_takes_only_the_all_reduces() -> None:
    """On CUDA the row-parallel linears (o, down: both layouts under shift) and the vocab-parallel
    embedding sum through a one-shot all-reduce of their group; the LM head's all-gather and the
    Ulysses all-to-all keep their process groups (they are not sums)."""
    from executors.model import LMHead, VocabEmbedding
    from executors.stage import use_one_shot_all_reduce

    shift_g, tp_g, sp_g = "shift-group", "tp-group", "sp-group"  # stand-ins for process groups
    plan = make_plan("mistral", tp=2, sp=2, shift=True, threshold=8)
    par = Par(tp=2, sp=2, tp_i=1, sp_i=0, tp_group=tp_g, sp_group=sp_g, shift_group=shift_g)
    model = parallelize(_meta("mistral"), plan, plan.stages[0], par)
    asked: list = []

    def make(groups: list) -> dict:
        asked.extend(groups)
        return {g: ("one-shot", g) for g in groups}

    use_one_shot_all_reduce(model, make)
    assert sorted(asked) == sorted([shift_g, tp_g])  # TP layout over all 4 GPUs, SP x TP layout over tp
    lay = model.layers["0"].layouts
    assert lay["tp"].attn.o.group == lay["tp"].mlp.down.group == ("one-shot", shift_g)
    assert lay["sp_tp"].attn.o.group == lay["sp_tp"].mlp.down.group == ("one-shot", tp_g)
    assert lay["tp"].attn.qkv.group is None and lay["tp"].mlp.gate_up.group is None
    assert isinstance(model.embed, VocabEmbedding) and model.embed.group == ("one-shot", shift_g)
    assert isinstance(model.lm_head, LMHead) and model.lm_head.group == shift_g
    assert isinstance(lay["sp_tp"].attn.core, UlyssesCore) and lay["sp_tp"].attn.core.group == sp_g


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_batches_images_without_changing_them(name: str) -> None:
    """Images of different sizes encoded in one tower call (what a step does) give each image's
    embeddings of its own call: attention stays within each frame or window, and runs of equal
    spans share one SDPA call (``vision.equal_runs``)."""
    from executors.encoders import load_tower
    from executors.vision import equal_runs, vision_shapes

    assert equal_runs([4, 4, 4, 2, 4]) == [(4, 3), (2, 1), (4, 1)] and equal_runs([]) == []
    v = model_args(config(name)).vision
    tower = load_tower(v, RandomSource(vision_shapes(v), seed=3), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    grids = [[(1, 4, 4)], [(1, 8, 4)], [(1, 4, 4)], [(1, 4, 4)]]
    pixels = [torch.randn(t * h * w, dim, generator=g) for (t, h, w), in grids]
    with torch.inference_mode():
        alone = torch.cat([tower(p, gr) for p, gr in zip(pixels, grids)])
        together = tower(torch.cat(pixels), [x for gr in grids for x in gr])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
