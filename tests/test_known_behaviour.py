"""Known behaviour of parallel inference holds in the cost model, for Llama-3.1-70B on catalog
GPUs without calibration (datasheet roofline) and with the measured H100/H200 profiles:

* raising TP lowers TTFT and TPOT, but sub-linearly (the all-reduces);
* PP does not lower latency, but raises the largest batch and, at large batch, throughput;
* SP x TP beats TP of the same GPU count at large step token counts and loses at small ones,
  so a shift crossover exists.
"""

import pytest

from costmodels.build import graph_for_config
from costmodels.estimate import estimate
from costmodels.model import CostModel
from costmodels.profile import load_profile
from graph.hf_config import load_config
from graph.opgraph import StepShape

SETUPS = [("h100", False), ("h100", True), ("h200", False), ("h200", True), ("mi300x", False), ("b200", False)]
IDS = [f"{g}-{'profile' if p else 'roofline'}" for g, p in SETUPS]


@pytest.fixture(scope="module")
def graph70():
    return graph_for_config(load_config("llama-3.1-70b"))


@pytest.fixture(scope="module", params=SETUPS, ids=IDS)
def cm(request, graph70):
    gpu, with_profile = request.param
    prof = load_profile(gpu) if with_profile else None
    if with_profile:
        assert prof is not None, f"committed {gpu} profile missing"
    return CostModel(graph70, gpu, profile=prof)


def _tps(cm):
    """TP degrees whose weights fit on this GPU (70B bf16 needs > 80 GB at tp=1)."""
    out = []
    for tp in (1, 2, 4, 8):
        if cm.memory(pp=1, tp=tp, sp=1).kv_tokens > 64 * 1152:
            out.append(tp)
    return out


def test_tp_lowers_latency_sub_linearly(cm):
    tps = _tps(cm)
    assert len(tps) >= 2
    est = {tp: estimate(cm, tp=tp, pp=1, batch=16, isl=1024, osl=128) for tp in tps}
    for a, b in zip(tps, tps[1:]):
        for metric in ("ttft_ms", "tpot_ms"):
            lo, hi = getattr(est[b], metric), getattr(est[a], metric)
            assert lo < hi, (metric, a, b)
            assert hi / lo < b / a, f"{metric}: tp {a}->{b} gave {hi / lo:.2f}x, not sub-linear"
    # the all-reduces are what keep it sub-linear
    s = StepShape.prefill([1024] * 16)
    top = tps[-1]
    assert cm.layers_time(0, 79, s, tp=top).comm_ms > 0.03 * cm.layers_time(0, 79, s, tp=top).total_ms


def test_pp_no_latency_gain_but_capacity_and_large_batch_throughput(cm):
    tp = 4 if 4 in _tps(cm) else 8
    one = estimate(cm, tp=tp, pp=1, batch=1, isl=1024, osl=128)
    two = estimate(cm, tp=tp, pp=2, batch=1, isl=1024, osl=128)
    assert two.ttft_ms >= 0.99 * one.ttft_ms
    assert two.tpot_ms >= 0.99 * one.tpot_ms
    assert two.max_batch > 1.5 * one.max_batch
    big = max(32, one.max_batch)  # a large batch that fits both
    big1 = estimate(cm, tp=tp, pp=1, batch=big, isl=1024, osl=128)
    big2 = estimate(cm, tp=tp, pp=2, batch=big, isl=1024, osl=128)
    assert big2.output_tok_s > 1.1 * big1.output_tok_s


def test_sp_tp_beats_tp_at_large_steps_and_loses_at_small(cm):
    for tp, sp in ((2, 4), (1, 8), (4, 2)):
        small = StepShape.decode([2048] * 16)
        large = StepShape.prefill([4096] * 4)
        t_small = [cm.step_time(small, tp=tp, sp=sp, mode=m).total_ms for m in ("sp_tp", "tp")]
        t_large = [cm.step_time(large, tp=tp, sp=sp, mode=m).total_ms for m in ("sp_tp", "tp")]
        assert t_small[0] > t_small[1], (tp, sp, "SP x TP should lose a 16-token step")
        assert t_large[0] < t_large[1], (tp, sp, "SP x TP should win a 16k-token step")
        cross, curve = cm.shift_crossover(tp=tp, sp=sp)
        assert cross is not None and 16 < cross < 16384
        assert len(curve) > 20


def test_estimate_reports_crossover_only_with_sp(cm):
    assert estimate(cm, tp=8, pp=1, batch=8, isl=512, osl=64).shift_crossover_tokens is None
    e = estimate(cm, tp=4, pp=1, sp=2, batch=8, isl=512, osl=64)
    assert e.shift_crossover_tokens is not None
    # a short prompt step runs in shifted TP, a long one in SP x TP
    assert e.modes["decode"] == "tp"
