"""`plan show`: a plan as a short human-readable report (mesh, stages, encoder placement,
shift threshold with its cost curves, memory per GPU, predicted metrics, runners-up)."""

from __future__ import annotations

from plans.schema import Plan


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g} ms"


def _engine(plan: Plan) -> str:
    """The engine the plan was searched for, with the version its export targets."""
    if plan.engine == "shiftplan":
        return "shiftplan (its own executors: `plan run`; `plan export --engine vllm|arctic|sglang` for another)"
    from planner.export.engines import INFO

    info = INFO[plan.engine]
    return (f"{plan.engine}: {info.title} {info.version} (the search kept only what it runs; launch with "
            f"`plan export PLAN`)")


def render_plan(plan: Plan) -> str:
    """Plain text, one section per aspect of the plan."""
    m = plan.mesh
    gpus = m.size + plan.vision.dedicated_gpus
    out = [f"plan {plan.name}  ({plan.model.name}, {plan.model.weights_dtype} weights, {plan.model.kv_dtype} KV; "
           f"{plan.hardware.nodes} x {plan.hardware.gpus_per_node} {plan.hardware.gpu})",
           f"objective  {plan.objective}",
           f"engine     {_engine(plan)}",
           f"mesh       {m.label()}  (dp={m.dp} pp={m.pp} tp={m.tp} sp={m.sp}; {gpus} GPUs"
           + (f", {plan.vision.dedicated_gpus} of them for the vision encoder" if plan.vision.dedicated_gpus else "")
           + f"; rank order {','.join(m.axis_order)}, sp innermost)",
           "stages"]
    for st in plan.stages:
        extra = [n for n in ("embedding", "lm_head", "vision") if getattr(st, n)]
        thr = getattr(st, "shift_threshold_tokens", None)
        out.append(f"  {st.index}: layers {st.first_layer}-{st.last_layer} ({st.num_layers})"
                   + (f" + {', '.join(extra)}" if extra else "")
                   + (f"; reference step {_ms(st.step_ms)}" if st.step_ms is not None else "")
                   + (f"; shift threshold {thr} tokens" if thr is not None else ""))
    if plan.model.vision_blocks:
        out.append(f"vision     {plan.vision.placement}"
                   + (f" ({plan.vision.dedicated_gpus} GPUs for the encoder alone)" if plan.vision.dedicated_gpus
                      else ""))
    if plan.shift.enabled:
        out.append(f"shift      steps of <= {plan.shift.threshold_tokens} tokens run TP{m.shift_degree}; larger ones "
                   f"run SP{m.sp} x TP{m.tp}")
        if plan.shift.curves:
            out.append("           stage 0 step time, on the workload's mix of decodes and prefill chunks:")
            out.append("           tokens   sp x tp ms    tp ms")
            for c in plan.shift.curves:
                win = "sp x tp" if c.sp_tp_ms < c.tp_ms else "tp"
                out.append(f"           {c.tokens:>6}   {c.sp_tp_ms:>10.4g}   {c.tp_ms:>6.4g}   ({win} faster)")
    else:
        out.append("shift      off (sp = 1)" if m.sp == 1 else "shift      off")
    g = plan.memory_gb
    out.append(f"memory     per GPU (most loaded stage): weights {g.weights:g} + shift copy {g.shift_copy:g} + KV {g.kv:g} "
               f"+ activations {g.activations:g} = {g.total:g} of {g.capacity:g} GB; KV capacity {g.kv_tokens} tokens "
               "per replica")
    p = plan.predicted
    pred = [f"predicted  ({p.source})"]
    if p.ttft_ms:
        pred.append(f"TTFT p50/p90/p99 {p.ttft_ms.p50:g}/{p.ttft_ms.p90:g}/{p.ttft_ms.p99:g} ms")
    if p.tpot_ms:
        pred.append(f"TPOT p50/p90/p99 {p.tpot_ms.p50:g}/{p.tpot_ms.p90:g}/{p.tpot_ms.p99:g} ms")
    if p.combined_tok_s is not None:
        pred.append(f"{p.combined_tok_s:g} tok/s combined")
    if p.output_tok_s is not None:
        pred.append(f"{p.output_tok_s:g} tok/s output")
    if p.goodput_rps is not None:
        pred.append(f"goodput {p.goodput_rps:g} req/s")
    if p.shift_tp_fraction is not None:
        pred.append(f"{100 * p.shift_tp_fraction:.0f}% of steps shifted")
    if p.meets_slo is not None:
        pred.append("meets SLO" if p.meets_slo else "MISSES SLO")
    out.append(pred[0] + " " + "; ".join(pred[1:]))
    if plan.runners_up:
        out.append("runners-up")
        for r in plan.runners_up:
            vis = f" ({r.vision})" if r.vision != "none" else ""
            out.append(f"  {r.mesh}{vis}: {r.reason}")
    pv = plan.provenance
    out.append(f"provenance spec {(pv.spec + ' ') if pv.spec else ''}{pv.spec_sha256[:12]}, model config {pv.model_config_sha256[:12]}, "
               f"cost profile {pv.cost_profile}, shiftplan {pv.shiftplan_version}")
    for n in plan.notes:
        out.append(f"note       {n}")
    return "\n".join(out) + "\n"
