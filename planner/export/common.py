"""What every engine export shares: the plan as the engine will run it (``Target``, after the
engine's limits), where each GPU of the plan sits (nodes, replicas, encoder GPUs), the launches,
and their rendering as a shell script, YAML or JSON.

Reads only the plan schema (``plans.schema``): a plan is data.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace
from typing import Literal

import yaml

from planner.export.engines import INFO, limit_of, placement_limit
from plans.errors import UserError
from plans.mesh import ParallelDims, mesh_label
from plans.schema import Plan

# Hugging Face checkpoints of the built-in presets (graph/presets/README.md).
PRESET_CHECKPOINTS = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct",
}

Kind = Literal["map", "downgrade", "note"]


@dataclass(frozen=True)
class Decision:
    kind: Kind  # map: plan field -> engine flag; downgrade: the engine runs less than planned; note: advice
    text: str


@dataclass(frozen=True)
class Target:
    """The plan as the engine will run it."""

    dp: int
    pp: int
    tp: int
    sp: int
    shift_threshold: int | None  # None: no shift
    stages: tuple[tuple[int, int], ...]  # inclusive layer ranges per pipeline stage
    placement: str  # none | stage0_tp | stage0_dp | dedicated
    dedicated_gpus: int
    max_batch_tokens: int
    max_seqs: int
    block_size: int
    weights_dtype: str
    kv_dtype: str

    @property
    def replica_gpus(self) -> int:
        return self.pp * self.tp * self.sp

    @property
    def label(self) -> str:
        return mesh_label(self.dp, self.pp, self.tp, self.sp)


@dataclass
class Launch:
    node: int
    role: Literal["llm", "encoder"]
    gpus: list[int]  # node-local GPU ids
    env: dict[str, str]
    argv: list[str]  # the command, program first

    def to_dict(self) -> dict:
        return {"node": self.node, "role": self.role, "gpus": self.gpus, "env": dict(self.env),
                "command": list(self.argv)}


@dataclass
class Export:
    engine: str
    plan_name: str
    target: Target
    launches: list[Launch]
    decisions: list[Decision] = field(default_factory=list)
    planned_for_engine: bool = False  # the plan was compiled with `engine:` this engine

    @property
    def downgrades(self) -> list[str]:
        return [d.text for d in self.decisions if d.kind == "downgrade"]


# ------------------------------------------------------------------ the plan, within the engine's limits


def target_of(plan: Plan) -> Target:
    m = plan.mesh
    return Target(dp=m.dp, pp=m.pp, tp=m.tp, sp=m.sp,
                  shift_threshold=plan.shift.threshold_tokens if plan.shift.enabled else None,
                  stages=tuple((s.first_layer, s.last_layer) for s in plan.stages),
                  placement=plan.vision.placement, dedicated_gpus=plan.vision.dedicated_gpus,
                  max_batch_tokens=plan.scheduler.max_batch_tokens, max_seqs=plan.scheduler.max_seqs,
                  block_size=plan.scheduler.block_size, weights_dtype=plan.model.weights_dtype,
                  kv_dtype=plan.model.kv_dtype)


def fit(plan: Plan, engine: str) -> tuple[Target, list[Decision]]:
    """The nearest plan ``engine`` runs, and a downgrade decision naming each limit it hit."""
    t = target_of(plan)
    out: list[Decision] = []
    for _ in range(4):  # each round removes one limit
        hit = limit_of(engine, t.pp, t.tp, t.sp, plan.model.architecture, t.max_seqs)
        if hit is None:
            break
        what, why = hit
        if what == "max_seqs":
            seqs = t.max_seqs - t.max_seqs % t.sp
            out.append(Decision("downgrade", f"{why}: max sequences {t.max_seqs} -> {seqs}"))
            t = replace(t, max_seqs=seqs)
            continue
        folded = replace(t, tp=t.tp * t.sp, sp=1, shift_threshold=None)
        lost = (f"; the SP x TP mode the plan chose for steps over {t.shift_threshold} tokens is lost"
                if t.shift_threshold is not None else "")
        out.append(Decision("downgrade", f"{why}: {t.label} runs as {folded.label} on the same GPUs (every step in "
                                         f"the plan's shifted TP{t.tp * t.sp} mode{lost})"))
        t = folded
    why = placement_limit(engine, t.placement)
    if why:
        out.append(Decision("downgrade", f"{why}: vision encoder all_dp -> stage0_dp (encoder replicated on the "
                                         "first stage's GPUs, images split across them)"))
        t = replace(t, placement="stage0_dp")
    return t, out


def refuse(plan: Plan, engine: str, downgrades: list[str]) -> UserError:
    info = INFO[engine]
    lines = "\n  - ".join(downgrades)
    return UserError(f"{info.title} {info.version} cannot run plan {plan.name} as planned:\n  - {lines}\n"
                     f"(without --no-downgrade the export runs the nearest plan it can; or set `engine: {engine}` in "
                     "the spec and recompile so the search keeps only plans this engine runs)")


# ------------------------------------------------------------------ where the GPUs are


@dataclass(frozen=True)
class Layout:
    gpus_per_node: int
    replicas: tuple[tuple[int, ...], ...]  # global GPU ids of each DP replica
    encoders: tuple[int, ...]  # global GPU ids of dedicated encoder GPUs

    def node(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def local(self, gpu: int) -> int:
        return gpu % self.gpus_per_node

    def replica_nodes(self, r: int) -> list[int]:
        return sorted({self.node(g) for g in self.replicas[r]})

    @property
    def replicas_span_nodes(self) -> bool:
        return any(len(self.replica_nodes(r)) > 1 for r in range(len(self.replicas)))


def layout_of(plan: Plan, t: Target) -> Layout:
    """LLM ranks first (replica-major, as the plan orders them), then the encoder GPUs."""
    gpn = plan.hardware.gpus_per_node
    size = t.replica_gpus
    dims = ParallelDims(dp=t.dp, pp=t.pp, tp=t.tp, sp=t.sp, placement=t.placement, dedicated_gpus=t.dedicated_gpus)
    replicas = tuple(tuple(sorted(dims.replica_ranks(r))) for r in range(t.dp))
    encoders = tuple(range(dims.size, dims.gpus))
    lay = Layout(gpn, replicas, encoders)
    if lay.replicas_span_nodes:
        for r in range(t.dp):
            nodes = lay.replica_nodes(r)
            whole = [g for n in nodes for g in range(n * gpn, (n + 1) * gpn)]
            if list(lay.replicas[r]) != whole:
                raise UserError(f"plan {plan.name}: replica {r} spans nodes {nodes} without filling them "
                                f"({size} GPUs per replica, {gpn} per node); an engine launches a multi-node replica "
                                "on whole nodes")
    return lay


def gpu_env(gpus: list[int], gpus_per_node: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES when a process uses only some of its node's GPUs."""
    if gpus == list(range(gpus_per_node)):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}


def head_addr(replica: int | None = None) -> str:
    """Placeholder the user fills in: the address of the first node (of a replica)."""
    return "${HEAD_ADDR}" if not replica else f"${{HEAD_ADDR_{replica}}}"


def model_path(plan: Plan, override: str | None) -> tuple[str, Decision]:
    if override:
        return override, Decision("map", f"model: {override} (--model)")
    if plan.model.preset and plan.model.preset in PRESET_CHECKPOINTS:
        ckpt = PRESET_CHECKPOINTS[plan.model.preset]
        return ckpt, Decision("map", f"model: preset {plan.model.preset} -> checkpoint {ckpt} (pass --model for a "
                                     "local copy)")
    path = plan.model.config or plan.model.name
    return path, Decision("note", f"model: {path} is the HF config the plan was compiled from (relative to the spec); "
                                  "pass --model with the checkpoint directory the engine should load")


def partition(t: Target) -> str:
    return ",".join(str(b - a + 1) for a, b in t.stages)


# ------------------------------------------------------------------ rendering

Format = Literal["cmd", "yaml", "json"]


def header(x: Export, explain: bool) -> list[str]:
    info = INFO[x.engine]
    lines = [f"{info.title} {info.version} launch for plan {x.plan_name}: {x.target.label}"
             + (f", shift threshold {x.target.shift_threshold} tokens" if x.target.shift_threshold else "")
             + (f", vision {x.target.placement}" if x.target.placement != "none" else ""),
             f"flags checked against {info.source}; every flag and choice an export can emit was parsed by "
             f"{info.title}'s own argument parser (bench/results/export_flags.md names the release)"]
    if x.planned_for_engine:
        lines.append(f"the plan was searched for {info.title} (engine: {x.engine}): only meshes and encoder placements "
                     "it runs were considered")
    nodes = sorted({la.node for la in x.launches})
    if len(nodes) > 1:
        lines.append(f"{len(nodes)} nodes: run each node's command on that node; set HEAD_ADDR to node 0's address")
    for d in x.decisions:
        if d.kind == "downgrade":
            lines.append(f"DOWNGRADED: {d.text}")
        elif d.kind == "note" or explain:
            lines.append(f"{d.kind}: {d.text}")
    return lines


def _cmd_line(la: Launch) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in la.env.items())
    words, i = [], 0
    argv = la.argv
    # the program and its positional arguments on the first line, then one flag (with its value) per line
    while i < len(argv) and not argv[i].startswith("--"):
        words.append(shlex.quote(argv[i]) if "$" not in argv[i] else argv[i])
        i += 1
    first = " ".join(([env] if env else []) + words)
    rest = []
    while i < len(argv):
        item = [argv[i]]
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            v = argv[i]
            item.append(v if v.startswith("${") else shlex.quote(v))
            i += 1
        rest.append(" ".join(item))
    return " \\\n    ".join([first] + rest)


def render(x: Export, fmt: Format, explain: bool = False) -> str:
    if fmt == "cmd":
        out = ["#!/usr/bin/env bash", "# generated by `plan export`; review with the plan it came from"]
        out += [f"# {line}" for line in header(x, explain)]
        for la in x.launches:
            gpus = ",".join(str(g) for g in la.gpus)
            out += ["", f"# node {la.node}: {'LLM server' if la.role == 'llm' else 'vision encoder server'} "
                        f"on GPUs {gpus}", _cmd_line(la)]
        return "\n".join(out) + "\n"
    info = INFO[x.engine]
    data = {
        "engine": x.engine,
        "engine_version": info.version,
        "flags_source": info.source,
        "plan": x.plan_name,
        "runs": {"dp": x.target.dp, "pp": x.target.pp, "tp": x.target.tp, "sp": x.target.sp,
                 "shift_threshold_tokens": x.target.shift_threshold, "vision": x.target.placement,
                 "max_batch_tokens": x.target.max_batch_tokens, "max_seqs": x.target.max_seqs},
        "downgrades": x.downgrades,
        "launches": [la.to_dict() for la in x.launches],
    }
    if explain:
        data["decisions"] = [{"kind": d.kind, "text": d.text} for d in x.decisions]
    else:
        data["notes"] = [d.text for d in x.decisions if d.kind == "note"]
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16", "int4": "bfloat16"}
"""The plan's weights dtype -> the engines' ``--dtype`` (quantized weights compute in bf16)."""


def dtype_flags(t: Target, out: list[Decision], engine: str, kv_fp8: str, fp8_detail: str, kv_downgrade: str,
                kv_auto: str) -> list[str]:
    """``--dtype``, ``--quantization`` and ``--kv-cache-dtype`` as vLLM-style servers spell them:
    ``kv_fp8`` the engine's name of the e4m3 cache; ``kv_downgrade`` (with ``{kv}`` and ``{act}``)
    and ``kv_auto`` what the explanation says when the KV dtype has no flag of its own."""
    act = DTYPE[t.weights_dtype]
    flags = ["--dtype", act]
    quantized = t.weights_dtype in ("fp8", "int4")
    out.append(Decision("map", f"weights {t.weights_dtype}" + (f", activations in {act}" if quantized else "")
                               + f" -> --dtype {act}"))
    if t.weights_dtype == "fp8":
        flags += ["--quantization", "fp8"]
        out.append(Decision("map", "weights fp8 -> --quantization fp8" + fp8_detail))
    elif t.weights_dtype == "int4":
        out.append(Decision("note", f"weights int4: point the model at an int4 (AWQ / GPTQ) checkpoint; {engine} reads "
                                    "its quantization from the checkpoint"))
    if t.kv_dtype == "fp8":
        flags += ["--kv-cache-dtype", kv_fp8]
        out.append(Decision("map", f"KV fp8 -> --kv-cache-dtype {kv_fp8}"))
    elif DTYPE[t.kv_dtype] != act:
        out.append(Decision("downgrade", kv_downgrade.format(kv=t.kv_dtype, act=act)))
    else:
        out.append(Decision("map", f"KV {t.kv_dtype} -> --kv-cache-dtype auto ({kv_auto})"))
    return flags
