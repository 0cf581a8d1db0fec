"""Property tests of the plan file: any edit of a valid plan (a value replaced by any YAML value,
a key dropped, a key added) either loads as a plan that keeps every invariant executors rely on,
or gives a UserError; any bytes do the same. A plan that loads round-trips byte for byte."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plans.errors import UserError
from plans.schema import Plan, dump_plan, load_plan, parse_plan

ROOT = Path(__file__).parents[1]
PLANS = sorted((ROOT / "plans").glob("*.plan.yaml"))
BASES = [yaml.safe_load(p.read_text()) for p in PLANS]


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    return out


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["dp", "pp", "tp", "sp", "h100", "cpu", "stage0_tp", "dedicated", "none", "[bold]x[/]"]),
)
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)


@st.composite
def edited_plan(draw) -> str:
    import copy

    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_value)
        elif action == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "delete" and isinstance(parent, list):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _invariants(plan: Plan) -> None:
    m, hw = plan.mesh, plan.hardware
    assert min(m.dp, m.pp, m.tp, m.sp) >= 1
    assert sorted(m.axis_order) == ["dp", "pp", "sp", "tp"]
    assert m.size + plan.vision.dedicated_gpus <= hw.gpus_per_node * hw.nodes
    assert len(plan.stages) == m.pp and plan.stages[0].first_layer == 0
    assert plan.stages[-1].last_layer == plan.model.num_layers - 1
    assert all(a.last_layer + 1 == b.first_layer for a, b in zip(plan.stages, plan.stages[1:]))
    g = plan.memory_gb
    for v in (g.weights, g.shift_copy, g.kv, g.activations, g.total, g.capacity):
        assert math.isfinite(v) and v >= 0
    assert plan.scheduler.max_seqs >= 1 and plan.scheduler.block_size >= 1 and plan.scheduler.max_batch_tokens >= 1
    # a shift plan's every stage has a threshold: its own, else the plan's (plans.mesh)
    assert not plan.shift.enabled or (m.sp >= 2 and all(plan.dims().threshold_of(i) is not None for i in range(m.pp)))


@settings(max_examples=400, deadline=None)
@given(edited_plan())
def test_any_edit_loads_as_a_sound_plan_or_gives_a_user_error(text: str):
    try:
        plan = parse_plan(text, "edited.plan.yaml")
    except UserError as e:
        assert "edited.plan.yaml" in str(e)  # every message names the file
        return
    _invariants(plan)
    again = dump_plan(plan)
    assert dump_plan(parse_plan(again)) == again


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)))
def test_any_bytes_give_a_user_error(tmp_path, data: bytes):
    p = tmp_path / "x.plan.yaml"
    p.write_bytes(data)
    try:
        load_plan(p)
    except UserError:
        return
    raise AssertionError("random bytes loaded as a plan")


def test_every_committed_plan_round_trips():
    for p in PLANS:
        plan = load_plan(p)
        _invariants(plan)
        assert dump_plan(plan) == p.read_text()


def test_goodput_is_ranked_to_the_nearest_step_at_the_rate():
    """At the spec's rate goodput / rate is compared to the nearest 5% step: 99.5% and 100% tie (a
    floor put them a step apart and let a 0.5% difference pick the plan), 97% and 100% do not; at
    twice the rate the step is floored."""
    from planner.scoring import GOODPUT_BINS, goodput_step

    assert GOODPUT_BINS == 20
    assert goodput_step(7.96, 8.0) == goodput_step(8.0, 8.0) == 1.0
    assert goodput_step(7.76, 8.0) == 0.95 and goodput_step(7.84, 8.0) == 1.0
    assert goodput_step(7.96, 8.0, nearest=False) == 0.95 and goodput_step(8.0, 8.0, nearest=False) == 1.0
