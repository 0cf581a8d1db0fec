"""Serving simulator sanity: Little's law, low-load TTFT = prefill step time, saturation, shift
fraction vs load, determinism, token conservation, KV preemption, PP/DP/vision placements.

Step times come from ``SyntheticCoster`` (affine in the step shape), so these tests check the
simulator, not the cost model."""

from __future__ import annotations

import math

import pytest

from costmodels.simulator import SimConfig, SloTargets, SyntheticCoster, simulate_config
from costmodels.simulator.engine import run
from costmodels.simulator.state import DONE
from costmodels.workload import ImageRule, Lengths, Request, Workload
from graph.opgraph import StepShape
from plans.errors import UserError

RULE = ImageRule("qwen2_vl")


def text_wl(rate: float, n: int = 1500, inp: float = 600, out: float = 200) -> Workload:
    return Workload(name="text", rate=rate, requests=n, input_tokens=Lengths(inp, 0.5, 1, 8192),
                    output_tokens=Lengths(out, 0.5, 2, 1024))


def mm_wl(rate: float, n: int = 1500) -> Workload:
    return Workload(name="mm", rate=rate, requests=n, input_tokens=Lengths(400, 0.5, 1, 4096),
                    output_tokens=Lengths(150, 0.5, 2, 1024), image_counts=(0, 1, 2, 4),
                    image_weights=(0.3, 0.4, 0.2, 0.1), resolutions=((448, 448), (1280, 720), (640, 480)), rule=RULE)


def cfg(**kw) -> SimConfig:
    base = dict(kv_tokens=400_000, max_batch_tokens=4096, max_seqs=128)
    base.update(kw)
    if "pp" in base and "lanes" not in kw:
        base["lanes"] = base["pp"]
    return SimConfig(**base)


def spaced(prompts: list[int], out: int = 3, gap: float = 100.0, images: list[tuple[int, ...]] | None = None) -> list[Request]:
    """Requests far apart (one in the system at a time)."""
    images = images or [()] * len(prompts)
    return [Request(i, i * gap, p, out, tuple(t for t in im), tuple(4 * t for t in im))
            for i, (p, im) in enumerate(zip(prompts, images))]


# ------------------------------------------------------------------ point 5: sanity


def test_littles_law_holds():
    """L (time-average requests in the system, integrated by the event loop) = lambda * W."""
    for c, wl in ((cfg(), text_wl(6.0, 3000)), (cfg(pp=2), mm_wl(5.0, 3000)), (cfg(dp=2), text_wl(12.0, 3000))):
        coster = SyntheticCoster(pp=c.pp)
        res = simulate_config(c, coster, wl)
        assert res.completed == res.requests
        assert res.mean_in_system > 1.0  # a real queue, not an empty system
        lw = res.arrival_rate * res.mean_e2e_s
        assert abs(res.mean_in_system - lw) / lw < 0.05, (res.mean_in_system, lw)
        # and against the offered rate, not only the measured one
        assert abs(res.mean_in_system - wl.rate * res.mean_e2e_s) / lw < 0.10


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_low_load_ttft_is_the_prefill_step_time(pp):
    c = cfg(pp=pp, shift=True, threshold=256, sp=2)
    coster = SyntheticCoster(pp=pp)
    prompts = [100, 700, 3000]
    log = run(c, coster, spaced(prompts))
    for r, p in zip(log.reqs, prompts):
        shape = StepShape.prefill([p])
        mode = "tp" if p <= 256 else "sp_tp"
        want = sum(coster.stage_ms(shape, mode)) + sum(coster.p2p_ms(p, s) for s in range(pp - 1))
        assert math.isclose((r.first - r.arrival) * 1e3, want, rel_tol=1e-9)


def test_look_ahead_holds_an_arrival_for_one_decode_step():
    """With the engine's look-ahead a request arriving during a decode step of a lone running request
    joins the step after the next one (that one was formed already): its TTFT grows by one decode
    step, the running request's tokens are not delayed, every token is still computed once, and a
    request arriving at an idle engine is not held."""
    coster = SyntheticCoster()
    reqs = [Request(0, 0.0, 100, 40, (), ()), Request(1, 0.0, 300, 3, (), ())]
    dec = coster.stage_ms(StepShape.decode([120]), "tp")[0] / 1e3
    pre = coster.stage_ms(StepShape.prefill([100]), "tp")[0] / 1e3
    reqs[1] = Request(1, pre + 10.4 * dec, 300, 3, (), ())  # during the 11th decode step of request 0
    plain, look = run(cfg(), coster, reqs), run(cfg(lookahead=True), coster, reqs)
    wait = (look.reqs[1].first - plain.reqs[1].first) / dec
    assert 0.95 < wait < 1.05, wait
    assert look.reqs[0].first == plain.reqs[0].first
    for log in (plain, look):
        assert log.step_tokens == sum(q.prompt_tokens + q.output_tokens - 1 for q in reqs)
    alone = run(cfg(lookahead=True), coster, spaced([100, 700]))
    for r, p in zip(alone.reqs, [100, 700]):
        assert math.isclose((r.first - r.arrival) * 1e3, coster.stage_ms(StepShape.prefill([p]), "tp")[0], rel_tol=1e-9)


def test_look_ahead_holds_a_request_encoded_during_a_decode_step():
    """With a dedicated encoder, a request whose image embeddings arrive during a decode step of a
    lone running request joins the step after the next one, as an arrival does: the engine formed
    that next step when the current one was sent (``Req.queued``, the time it joined its lane)."""
    coster = SyntheticCoster()
    c = dict(placement="dedicated", dedicated_gpus=1)
    dec = coster.stage_ms(StepShape.decode([120]), "tp")[0] / 1e3
    pre = coster.stage_ms(StepShape.prefill([100]), "tp")[0] / 1e3
    img, patches = (64,), (256,)
    ready = coster.vision_ms(patches, tp=1, dp=1) / 1e3 + coster.embed_ms(64) / 1e3  # encoded and sent
    reqs = [Request(0, 0.0, 100, 40, (), ()), Request(1, pre + 10.4 * dec - ready, 50, 3, img, patches)]
    plain, look = run(cfg(**c), coster, reqs), run(cfg(lookahead=True, **c), coster, reqs)
    wait = (look.reqs[1].first - plain.reqs[1].first) / dec
    assert 0.95 < wait < 1.05, wait
    assert look.reqs[0].first == plain.reqs[0].first


def test_no_step_is_formed_ahead_after_a_long_one():
    """A step of more than ``engine_shapes.LOOKAHEAD_MAX_TOKENS`` tokens is not followed by one formed
    ahead (the engine's rule): a request arriving during a long prefill joins the very next step, as
    without look-ahead, where during a short one it waits one step more."""
    from plans.engine_shapes import LOOKAHEAD_MAX_TOKENS

    coster = SyntheticCoster()
    for prompt, held in ((LOOKAHEAD_MAX_TOKENS + 1000, False), (LOOKAHEAD_MAX_TOKENS // 2, True)):
        pre = coster.stage_ms(StepShape.prefill([prompt]), "tp")[0] / 1e3
        reqs = [Request(0, 0.0, prompt, 20, (), ()), Request(1, 0.5 * pre, 50, 3, (), ())]
        plain, look = run(cfg(), coster, reqs), run(cfg(lookahead=True), coster, reqs)
        assert (look.reqs[1].first > plain.reqs[1].first) == held, prompt


def test_steps_not_formed_ahead_wait_for_the_driver():
    """With look-ahead only a step formed once the last tokens were back starts the coster's driver
    time later: the first after an idle lane (a lone request's prefill), or one whose requests
    arrived during a step that ended every running request. Every step formed ahead does not: the
    decodes after a prefill, the next prompt when a seat frees on a saturated replica; nor does any
    step without look-ahead."""

    class Driven(SyntheticCoster):
        def form_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
            return 0.5 + (1.0 if prefill else 0.0) + 0.01 * seqs

    reqs = spaced([100], out=6)
    bare, driven = SyntheticCoster(), Driven()
    base, look, off = run(cfg(lookahead=True), bare, reqs), run(cfg(lookahead=True), driven, reqs), run(cfg(), driven, reqs)
    r0, r1 = base.reqs[0], look.reqs[0]
    assert (r1.first - r0.first) * 1e3 == pytest.approx(1.51)
    assert (r1.finish - r0.finish) * 1e3 == pytest.approx(1.51)
    assert off.reqs[0].finish == run(cfg(), bare, reqs).reqs[0].finish
    # one seat, two more requests waiting from the start: each next prompt is formed ahead too
    crowd = reqs + [Request(i, 0.0, 100, 6, (), ()) for i in (1, 2)]
    one = cfg(lookahead=True, max_seqs=1)
    plain, timed = run(one, bare, crowd).reqs, run(one, driven, crowd).reqs
    for a, b in zip(plain, timed):
        assert (b.finish - a.finish) * 1e3 == pytest.approx(1.51)
    # a request arriving during the last step of a lone one: nothing was left to form ahead
    dec = bare.stage_ms(StepShape.decode([105]), "tp")[0] / 1e3
    late = reqs + [Request(1, r0.finish - 0.1 * dec, 100, 3, (), ())]
    plain, timed = run(cfg(lookahead=True), bare, late).reqs, run(cfg(lookahead=True), driven, late).reqs
    assert plain[1].arrival > plain[0].finish - dec and timed[1].arrival > timed[0].finish - dec
    assert ((timed[1].first - timed[0].finish) - (plain[1].first - plain[0].finish)) * 1e3 == pytest.approx(1.51)


def test_low_load_ttft_with_chunked_prefill():
    """A prompt over the token budget is prefilled in chunks, each seeing the earlier ones as context."""
    c = cfg(max_batch_tokens=1000)
    coster = SyntheticCoster(tp=(10.0, 0.01, 1e-5, 1e-4))  # sp = 1: every step runs plain TP
    log = run(c, coster, spaced([2500]))
    want = sum(coster.stage_ms(StepShape.prefill([n], [k]), "tp")[0] for n, k in ((1000, 0), (1000, 1000), (500, 2000)))
    assert math.isclose((log.reqs[0].first - log.reqs[0].arrival) * 1e3, want, rel_tol=1e-9)


@pytest.mark.parametrize("placement", ["stage0_tp", "stage0_dp", "all_dp", "dedicated"])
def test_low_load_ttft_includes_the_vision_encoder(placement):
    c = cfg(pp=2, tp=2, sp=2, placement=placement, dedicated_gpus=2 if placement == "dedicated" else 0)
    coster = SyntheticCoster(pp=2)
    img = (1196, 256)
    log = run(c, coster, spaced([500], images=[img]))  # prompt = 500 text + image tokens
    patches = tuple(4 * t for t in img)
    prefill = coster.stage_ms(StepShape.prefill([500 + sum(img)]), "sp_tp")
    llm = sum(prefill) + coster.p2p_ms(500 + sum(img), 0)
    vis = {"stage0_tp": coster.vision_ms(patches, tp=4, dp=1), "stage0_dp": coster.vision_ms(patches, tp=1, dp=4),
           "all_dp": 2 * coster.vision_ms(patches, tp=1, dp=8),
           "dedicated": coster.vision_ms(patches, tp=1, dp=2) + coster.embed_ms(sum(img))}[placement]
    assert math.isclose((log.reqs[0].first - log.reqs[0].arrival) * 1e3, llm + vis, rel_tol=1e-9)


def test_throughput_saturates_as_the_rate_rises():
    c = cfg()
    coster = SyntheticCoster()
    rates = [2, 8, 32, 64, 128]
    tput = [simulate_config(c, coster, text_wl(r, 1500)).output_tok_s for r in rates]
    offered = [r * 200 for r in rates]  # mean output tokens per request
    assert abs(tput[0] - offered[0]) / offered[0] < 0.1  # below capacity: throughput = offered load
    assert tput[1] > 2.5 * tput[0]
    assert tput[-1] < 0.5 * offered[-1]  # far beyond capacity
    assert abs(tput[-1] - tput[-2]) / tput[-1] < 0.05  # flat: saturated


def test_shift_fraction_falls_with_load():
    c = cfg(shift=True, threshold=256, sp=2)
    coster = SyntheticCoster()
    fr = [simulate_config(c, coster, text_wl(r, 300 if r < 1 else 1200)).shift_tp_fraction for r in (0.5, 5, 20, 80)]
    assert fr[0] > 0.9  # a lone request decodes in small steps
    assert all(a > b for a, b in zip(fr, fr[1:])), fr
    assert simulate_config(cfg(), coster, text_wl(5, 500)).shift_tp_fraction == 0.0  # shift off: never TP mode


def test_same_seed_same_result_different_seed_differs():
    c = cfg(pp=2, shift=True, threshold=256, sp=2, placement="stage0_dp")
    coster = SyntheticCoster(pp=2)
    a = simulate_config(c, coster, mm_wl(6.0, 800), seed=11).to_json()
    b = simulate_config(c, coster, mm_wl(6.0, 800), seed=11).to_json()
    d = simulate_config(c, coster, mm_wl(6.0, 800), seed=12).to_json()
    assert a == b
    assert a != d


# ------------------------------------------------------------------ mechanics


def test_every_token_is_computed_once_without_preemption():
    c = cfg(pp=2, shift=True, threshold=128, sp=2)
    wl = mm_wl(8.0, 600)
    reqs = wl.sample()
    log = run(c, SyntheticCoster(pp=2), reqs)
    assert log.preemptions == 0
    assert all(r.state == DONE for r in log.reqs)
    # every prompt token once in a prefill, every output token after the first once in a decode
    assert log.step_tokens == sum(q.prompt_tokens + q.output_tokens - 1 for q in reqs)
    for r in log.reqs:
        assert r.arrival <= r.first <= r.finish


def test_kv_pressure_preempts_and_recomputes():
    c = cfg(kv_tokens=6000, max_seqs=64)
    reqs = text_wl(50.0, 300, inp=800, out=300).sample()
    log = run(c, SyntheticCoster(), reqs)
    assert log.preemptions > 0
    assert all(r.state == DONE for r in log.reqs)
    assert 0.9 < log.kv_peak <= 1.0
    assert 0.3 < log.kv_area / log.t_end <= log.kv_peak  # time-average KV share in use
    # recompute costs extra prefill tokens beyond the no-preemption total
    assert log.step_tokens > sum(q.prompt_tokens + q.output_tokens - 1 for q in reqs)


def test_requests_larger_than_the_kv_cache_are_rejected_not_hung():
    c = cfg(kv_tokens=1000)
    reqs = spaced([500, 2000, 300], out=10)
    res = simulate_config(c, SyntheticCoster(), Workload("x", 1.0, 3, trace=tuple(reqs), trace_rate=1.0))
    assert res.rejected == 1 and res.completed == 2
    assert any("rejected" in n for n in res.notes)


def test_pipeline_throughput_is_bounded_by_the_slowest_stage():
    class Unbalanced(SyntheticCoster):
        def stage_ms(self, shape, mode, decode=None):
            base = super().stage_ms(shape, mode)[0]
            return (1.5 * base, 0.5 * base)

    c = cfg(pp=2)
    res = simulate_config(c, Unbalanced(pp=2), text_wl(200.0, 1500))
    assert res.stage_utilisation[0] > 0.97  # the slow stage is the bottleneck at overload
    assert res.stage_utilisation[1] < 0.5


def test_dp_doubles_saturated_throughput_and_balances():
    coster = SyntheticCoster()
    one = simulate_config(cfg(), coster, text_wl(200.0, 2000)).output_tok_s
    two_log = run(cfg(dp=2), coster, text_wl(200.0, 2000).sample())
    two = simulate_config(cfg(dp=2), coster, text_wl(200.0, 2000)).output_tok_s
    assert 1.8 < two / one < 2.2
    share = sum(r.replica == 0 for r in two_log.reqs) / len(two_log.reqs)
    assert 0.45 < share < 0.55


def test_dedicated_encoder_keeps_images_off_the_llm_gpus():
    """Same traffic: a dedicated encoder leaves stage 0's busy time to the LLM alone."""
    coster = SyntheticCoster(pp=2, v_ms_per_kpatch=200.0)
    wl = mm_wl(3.0, 600)
    on0 = simulate_config(cfg(pp=2, placement="stage0_tp"), coster, wl)
    ded = simulate_config(cfg(pp=2, placement="dedicated", dedicated_gpus=2), coster, wl)
    assert on0.stage_utilisation[0] > on0.stage_utilisation[1] + 0.02  # encoder time lands on stage 0
    assert abs(ded.stage_utilisation[0] - ded.stage_utilisation[1]) < 0.01
    assert ded.encoder_utilisation is not None and ded.encoder_utilisation > 0


def test_goodput_counts_requests_within_slo():
    coster = SyntheticCoster()
    res = simulate_config(cfg(), coster, text_wl(4.0, 800), slo=SloTargets(ttft_p90_ms=1e9, tpot_p90_ms=1e9))
    assert math.isclose(res.goodput_rps, 4.0)  # everyone meets a loose SLO: goodput is the offered rate
    assert res.arrival_rate > 4.0  # this sample arrives a little faster; goodput still never exceeds the offer
    assert res.meets_slo is True
    tight = simulate_config(cfg(), coster, text_wl(4.0, 800), slo=SloTargets(ttft_p90_ms=1e-3))
    assert tight.goodput_rps == 0.0 and tight.meets_slo is False
    mid = simulate_config(cfg(), coster, text_wl(4.0, 800), slo=SloTargets(tpot_p90_ms=res.tpot_ms["p50"]))
    assert 0.45 * 4.0 < mid.goodput_rps < 0.55 * 4.0  # half the TPOTs are <= p50


def test_percentiles_are_ordered():
    res = simulate_config(cfg(pp=2), SyntheticCoster(pp=2), mm_wl(6.0, 800))
    for d in (res.ttft_ms, res.tpot_ms, res.e2e_ms):
        assert 0 < d["p50"] <= d["p90"] <= d["p99"]


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="dedicated_gpus"):
        SimConfig(placement="dedicated")
    with pytest.raises(UserError, match="placement"):
        SimConfig(placement="gpu7")
    with pytest.raises(UserError, match="kv_tokens"):
        SimConfig(kv_tokens=0)


def test_stages_with_their_own_thresholds_shift_separately():
    """pp=2, stage thresholds 100 and 1000: a 500-token prefill runs SP x TP on stage 0, TP on stage 1."""
    class PerMode(SyntheticCoster):
        def stage_ms(self, shape, mode, decode=None):
            base = super().stage_ms(shape, mode)[0]
            return (base, 2 * base)  # stage 1 twice as slow, to tell the stages apart

    c = cfg(pp=2, sp=2, shift=True, threshold=100, stage_thresholds=(100, 1000))
    coster = PerMode(pp=2)
    log = run(c, coster, spaced([500], out=1))
    shape = StepShape.prefill([500])
    want = coster.stage_ms(shape, "sp_tp")[0] + coster.stage_ms(shape, "tp")[1] + coster.p2p_ms(500, 0)
    assert math.isclose((log.reqs[0].first - log.reqs[0].arrival) * 1e3, want, rel_tol=1e-9)
    assert log.steps == 1 and log.steps_tp == 0.5  # half of the step's stages ran shifted
