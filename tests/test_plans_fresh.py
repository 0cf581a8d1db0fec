"""Every example has a committed plan in plans/, and recompiling the example gives that file
byte for byte (CI fails when a committed plan is stale: re-run `plan compile EXAMPLE -o PLAN`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.api import compile_spec, dump_plan, load_plan
from planner.diff import diff_plans, render

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_every_example_has_a_plan():
    assert EXAMPLES
    missing = [e.stem for e in EXAMPLES if not (ROOT / "plans" / f"{e.stem}.plan.yaml").is_file()]
    assert not missing, f"no committed plan for {missing}; run `plan compile examples/X.yaml -o plans/X.plan.yaml`"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_committed_plan_is_fresh(example: Path):
    committed = ROOT / "plans" / f"{example.stem}.plan.yaml"
    if not committed.is_file():
        pytest.fail(f"missing {committed.name}")
    fresh = compile_spec(example)
    changes = diff_plans(load_plan(committed), fresh)
    assert not changes, (f"plans/{committed.name} is stale; `plan compile examples/{example.name} -o "
                         f"plans/{committed.name}` gives:\n" + render(changes))
    # the file records its spec relative to itself (`plan simulate PLAN` finds it without --workload)
    assert dump_plan(fresh.located(committed, example)) == committed.read_text()
    assert load_plan(committed).spec_file(committed).resolve() == example.resolve()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_shortlist_finds_the_simulators_best(example: Path, monkeypatch: pytest.MonkeyPatch):
    """The simulator scores only a shortlist of the candidates ranked by the static estimate; the
    brute force, every feasible candidate simulated, must choose the same mesh and placement."""
    import functools

    from planner import pipeline, scoring

    shortlisted = compile_spec(example)
    monkeypatch.setattr(pipeline, "shortlist", functools.partial(scoring.shortlist, k=10_000))
    brute = compile_spec(example)
    assert (shortlisted.mesh, shortlisted.vision) == (brute.mesh, brute.vision), example.stem
