"""Arctic Inference v0.2.0 launches: vLLM v0.18.0's ``vllm serve`` with the plugin enabled
(``ARCTIC_INFERENCE_ENABLED=1``) and its Ulysses / shift flags.

Mapping on top of vLLM's: sp -> ``--ulysses-sequence-parallel-size``; shift ->
``--enable-shift-parallel`` and the plan's threshold -> ``--shift-parallel-threshold`` (Arctic runs
a step in full TP when its scheduled tokens are <= the threshold, the plan's rule: steps of at
most ``threshold_tokens`` run as TP of degree tp*sp). Arctic orders ranks DP x PP x SP x TP
itself; the KV layout is the same in both modes either way.
"""

from __future__ import annotations

from planner.export import vllm
from planner.export.common import Decision, Launch, Layout, Target
from plans.schema import Plan


def export(plan: Plan, t: Target, lay: Layout, model: str, out: list[Decision]) -> list[Launch]:
    extra: list[str] = []
    if t.sp > 1:
        extra += ["--ulysses-sequence-parallel-size", str(t.sp)]
        out.append(Decision("map", f"sp {t.sp} -> --ulysses-sequence-parallel-size {t.sp} (GPUs per replica = tp x sp "
                                   f"= {t.tp * t.sp})"))
    if t.shift_threshold is not None:
        extra += ["--enable-shift-parallel", "--shift-parallel-threshold", str(t.shift_threshold)]
        out.append(Decision("map", f"shift threshold {t.shift_threshold} tokens (from the plan's cost curves) -> "
                                   f"--enable-shift-parallel --shift-parallel-threshold {t.shift_threshold} (Arctic's "
                                   "default is 512)"))
    elif t.sp == 1:
        out.append(Decision("note", "sp = 1: Arctic runs this plan as plain vLLM (no Ulysses, no shift)"))
    return vllm.build(plan, t, lay, model, out, extra, {"ARCTIC_INFERENCE_ENABLED": "1"}, ["vllm", "serve"])
