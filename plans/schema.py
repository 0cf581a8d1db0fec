"""The plan file: the one contract between the planner and the executors.

A plan is data. The planner writes it (``planner.compile``), a person reviews it
(``plan show`` / ``plan diff``), and an executor applies it (``executors.load``).
This module imports only pydantic, PyYAML and ``plans.mesh`` so every side can read it.

Rank layout
-----------
The global rank of a GPU is row-major over ``Mesh.axis_order`` (default ``dp, pp, tp, sp``);
``plans.mesh`` holds that arithmetic and the rest that follows from a mesh (head splits, shift
modes, encoder stages), and ``Plan.check`` validates a plan with it.

Canonical form
--------------
``dump_plan`` writes keys in schema order, floats rounded to 4 significant digits, and no
YAML anchors, so the same spec yields byte-identical files on any machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from plans.errors import UserError, read_user_text
from plans.gpu import CATALOG_NAMES, GPU, catalog_key
from plans.mesh import AXES, AxisName, ParallelDims, VisionPlacement, mesh_label
from plans.numbers import Float, Int

SCHEMA_VERSION = 1

Backend = Literal["eager", "compile", "tensorrt"]
Engine = Literal["shiftplan", "vllm", "arctic", "sglang"]  # what runs the plan (spec field `engine`)


# Numbers refuse booleans (plans.numbers); no field takes NaN or infinity (allow_inf_nan=False).
Count = Annotated[Int, Field(ge=1)]  # a degree, a size, a count of things that must exist
NonNeg = Annotated[Int, Field(ge=0)]
Figure = Annotated[Float, Field(ge=0)]  # a time, a size, a rate: finite and not negative


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class Provenance(_Model):
    spec: str | None = None  # the spec compiled, relative to the plan file's folder (None: not recorded)
    spec_sha256: str
    model_config_sha256: str
    cost_profile: str  # profile id, or "roofline:<gpu>" when no calibration profile exists
    shiftplan_version: str


class ModelRef(_Model):
    """Which model the plan is for; executors resolve it to an HF config."""

    name: str  # preset name or config file stem
    preset: str | None = None
    config: str | None = None  # path to an HF config file/dir, relative to the spec's folder
    architecture: str  # e.g. LlamaForCausalLM, Qwen2VLForConditionalGeneration
    weights_dtype: Literal["bf16", "fp16", "fp32", "fp8", "int4"] = "bf16"
    kv_dtype: Literal["bf16", "fp16", "fp32", "fp8"] = "bf16"
    num_layers: Count
    vision_blocks: NonNeg = 0


class Hardware(_Model):
    gpu: str  # catalog name, or the name of the inline GPU in ``gpu_spec``
    gpus_per_node: Annotated[Int, Field(ge=1, le=64)]  # the spec's bounds (planner.spec.HardwareSection)
    nodes: Annotated[Int, Field(ge=1, le=1024)]
    gpu_spec: GPU | None = None  # the figures of an inline GPU (a spec's hardware.gpu mapping)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


class Mesh(_Model):
    """Parallel degrees. GPUs used by the LLM = dp*pp*tp*sp (dedicated vision GPUs aside)."""

    dp: Count = 1
    pp: Count = 1
    tp: Count = 1
    sp: Count = 1
    axis_order: list[AxisName] = Field(default_factory=lambda: list(AXES))

    @field_validator("axis_order")
    @classmethod
    def _each_axis_once(cls, v: list[str]) -> list[str]:
        dup = sorted({a for a in v if v.count(a) > 1})
        missing = [a for a in AXES if a not in v]
        if dup or missing:
            raise ValueError("must name each of dp, pp, tp, sp exactly once"
                             + (f"; repeated: {', '.join(dup)}" if dup else "")
                             + (f"; missing: {', '.join(missing)}" if missing else ""))
        return v

    @property
    def size(self) -> int:
        return self.dp * self.pp * self.tp * self.sp

    @property
    def shift_degree(self) -> int:
        """P: the TP degree of shifted mode (all GPUs of one pipeline stage)."""
        return self.tp * self.sp

    def label(self) -> str:
        return mesh_label(self.dp, self.pp, self.tp, self.sp)


class Stage(_Model):
    """One pipeline stage: a contiguous range of text decoder layers (inclusive)."""

    index: NonNeg
    first_layer: NonNeg
    last_layer: NonNeg
    embedding: bool = False  # holds the token embedding
    lm_head: bool = False  # holds final norm + lm_head
    vision: bool = False  # the vision encoder runs on this stage's GPUs (``ParallelDims.encoder_stages``)
    step_ms: Figure | None = None  # predicted time of the reference step on this stage
    shift_threshold_tokens: NonNeg | None = None  # this stage's own SP x TP vs TP crossover - 1 (sp > 1)

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer + 1


class Vision(_Model):
    placement: VisionPlacement = "none"
    dedicated_gpus: NonNeg = 0  # GPUs given to the encoder alone (placement == dedicated)


class CurvePoint(_Model):
    tokens: Count
    sp_tp_ms: Figure
    tp_ms: Figure


class Shift(_Model):
    """Shift parallelism: steps of at most ``threshold_tokens`` tokens run as plain TP of
    degree tp*sp; larger steps run SP x TP. ``curves`` shows why (per stage 0 by default)."""

    enabled: bool = False
    threshold_tokens: NonNeg | None = None
    curves: list[CurvePoint] = Field(default_factory=list)


class MemoryPerGPU(_Model):
    """GB (1e9 bytes) per GPU of the most loaded stage."""

    weights: Figure
    shift_copy: Figure = 0.0
    kv: Figure
    activations: Figure
    total: Figure
    capacity: Figure
    kv_tokens: NonNeg  # KV cache capacity in tokens, per replica


class Scheduler(_Model):
    # upper bounds: the spec's (planner.spec.SearchSection), a KV block of at most 1024 tokens
    max_batch_tokens: Annotated[Int, Field(ge=1, le=10_000_000)] = 8192  # token budget of one step (prefill + decodes)
    max_seqs: Annotated[Int, Field(ge=1, le=100_000)] = 256
    block_size: Annotated[Int, Field(ge=1, le=1024)] = 16  # paged KV cache block, tokens
    # under PP: pipeline micro-batches in flight (max(pp, microbatches) lanes); at pp = 1: forward passes
    # each step is split into, run one after another
    microbatches: Count = 1


class Percentiles(_Model):
    p50: Figure
    p90: Figure
    p99: Figure


class Predicted(_Model):
    source: Literal["simulator", "estimate"] = "estimate"
    ttft_ms: Percentiles | None = None
    tpot_ms: Percentiles | None = None
    output_tok_s: Figure | None = None
    combined_tok_s: Figure | None = None
    goodput_rps: Figure | None = None
    shift_tp_fraction: Annotated[Float, Field(ge=0, le=1)] | None = None
    meets_slo: bool | None = None


class RunnerUp(_Model):
    mesh: str  # e.g. "tp4xsp2", "pp2xtp4"
    vision: VisionPlacement = "none"
    score: Float | None = None
    reason: str  # why it lost, with figures


class Plan(_Model):
    schema_version: Int = SCHEMA_VERSION
    name: str = Field(min_length=1)
    provenance: Provenance
    model: ModelRef
    hardware: Hardware
    objective: str
    engine: Engine = "shiftplan"  # the engine the search was restricted to; not written when shiftplan
    mesh: Mesh
    stages: list[Stage]
    vision: Vision = Field(default_factory=Vision)
    shift: Shift = Field(default_factory=Shift)
    memory_gb: MemoryPerGPU
    scheduler: Scheduler = Field(default_factory=Scheduler)
    backend: Backend = "eager"
    predicted: Predicted = Field(default_factory=Predicted)
    runners_up: list[RunnerUp] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    # the spec file this plan was compiled from (absolute); ``save_plan`` records it relative to the plan file
    _spec_file: str | None = PrivateAttr(None)

    def check(self) -> "Plan":
        """Validate the cross-field arithmetic; raise UserError naming what is off.

        Field types and ranges are pydantic's (``Plan.model_validate``); this checks what no single
        field can: stages against the mesh and the model, the mesh against the hardware and the shift
        threshold against the mesh (``plans.mesh.ParallelDims``), the encoder's stages, micro-batches,
        memory against capacity, the GPU against the catalog."""
        name, m = self.name, self.mesh
        if len(self.stages) != m.pp:
            raise UserError(f"plan {name}: mesh.pp = {m.pp} but {len(self.stages)} stages are listed")
        expect = 0
        for i, st in enumerate(self.stages):
            if st.index != i:
                raise UserError(f"plan {name}: stages[{i}] has index {st.index}; stages are listed in order from 0")
            if st.first_layer != expect or st.last_layer < st.first_layer:
                raise UserError(
                    f"plan {name}: stage {st.index} covers layers {st.first_layer}-{st.last_layer}; "
                    f"stages must be contiguous from layer {expect}"
                )
            expect = st.last_layer + 1
            for flag, holder in (("embedding", 0), ("lm_head", m.pp - 1)):
                if getattr(st, flag) != (i == holder):
                    raise UserError(f"plan {name}: stages[{i}].{flag} is {str(getattr(st, flag)).lower()}; the "
                                    f"{flag} is on stage {holder} alone (the {'first' if holder == 0 else 'last'} of "
                                    f"mesh.pp = {m.pp})")
        if expect != self.model.num_layers:
            raise UserError(f"plan {name}: stages cover {expect} layers, the model has {self.model.num_layers}")
        dims = self.dims()  # degrees, axis order, mesh vs hardware, placement, shift (plans.mesh)
        want = dims.encoder_stages()
        have = tuple(i for i, st in enumerate(self.stages) if st.vision)
        if have != want:
            raise UserError(f"plan {name}: stages {list(have)} have vision: true; vision.placement "
                            f"{self.vision.placement} with model.vision_blocks = {self.model.vision_blocks} runs the "
                            f"encoder on stages {list(want)}")
        if self.vision.placement != "dedicated" and self.vision.dedicated_gpus:
            raise UserError(f"plan {name}: vision.dedicated_gpus = {self.vision.dedicated_gpus} but the placement is "
                            f"'{self.vision.placement}', not 'dedicated'")
        sch = self.scheduler
        if sch.microbatches > min(sch.max_seqs, sch.max_batch_tokens):
            raise UserError(f"plan {name}: scheduler.microbatches = {sch.microbatches} micro-batches in flight, but a "
                            f"micro-batch holds at least one of max_seqs = {sch.max_seqs} sequences and one of "
                            f"max_batch_tokens = {sch.max_batch_tokens} tokens")
        g = self.memory_gb
        if g.total > g.capacity * 1.001:  # files round to 4 significant digits
            raise UserError(f"plan {name}: memory_gb.total {g.total:g} GB exceeds the GPU's capacity {g.capacity:g} GB")
        self._check_gpu()
        return self

    def check_model(self, info: Any) -> "Plan":
        """The plan against the model its ``model`` section resolves to (``info``: the config's
        ``graph.opgraph.ModelInfo``); UserError when the plan was made for another model (a hand edit of
        ``model.preset``, a config file that changed), which would otherwise run or simulate the wrong layers."""
        m = self.model
        depth = int((info.vision or {}).get("depth", 0)) if info.vision else 0
        which = m.preset or m.config or m.name
        for field, ours, theirs in (("architecture", m.architecture, info.architecture),
                                    ("num_layers", m.num_layers, info.layers),
                                    ("vision_blocks", m.vision_blocks, depth)):
            if ours != theirs:
                raise UserError(f"plan {self.name}: model.{field} is {ours} but the model config of {which} has "
                                f"{theirs}; the plan was compiled for another model: recompile it")
        return self

    def dims(self) -> ParallelDims:
        """The parallel arithmetic of this plan (``plans.mesh``); UserError when it does not add up."""
        return ParallelDims.from_plan(self)

    def _check_gpu(self) -> None:
        hw = self.hardware
        if hw.gpu_spec is not None:
            if hw.gpu_spec.name != hw.gpu:
                raise UserError(f"plan {self.name}: hardware.gpu '{hw.gpu}' but hardware.gpu_spec.name "
                                f"'{hw.gpu_spec.name}'")
            return
        if catalog_key(hw.gpu) is None:
            import difflib

            close = difflib.get_close_matches(hw.gpu.lower(), CATALOG_NAMES, n=3, cutoff=0.4)
            raise UserError(f"plan {self.name}: hardware.gpu: unknown GPU '{hw.gpu}'"
                            + (f" (nearest: {', '.join(close)})" if close else "")
                            + f"; catalog: {', '.join(CATALOG_NAMES)}; a plan for another GPU carries its figures "
                              "in hardware.gpu_spec")

    def located(self, path: str | Path, spec_file: str | Path | None) -> "Plan":
        """This plan as written to ``path``: ``provenance.spec`` is ``spec_file`` relative to the
        plan file's folder (POSIX separators, so the file is the same on any machine)."""
        if spec_file is None:
            return self
        rel = os.path.relpath(Path(spec_file).resolve(), Path(path).resolve().parent)
        return self.model_copy(update={"provenance": self.provenance.model_copy(
            update={"spec": Path(rel).as_posix()})})

    def spec_file(self, plan_path: str | Path) -> Path | None:
        """The spec recorded in ``provenance.spec``, resolved against the plan file's folder."""
        if not self.provenance.spec:
            return None
        return Path(plan_path).parent / self.provenance.spec


# ---------------------------------------------------------------- canonical YAML


def _round(x: float, digits: int = 4) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, float):
        return _round(obj)
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # never emit &anchors
        return True


def dump_plan(plan: Plan) -> str:
    """Canonical YAML text of a plan (schema key order, rounded floats, no anchors)."""
    data = _canonical(plan.model_dump(mode="json"))
    if data.get("engine") == "shiftplan":  # the default stays out of the file (plans written before it existed)
        del data["engine"]
    if data["hardware"].get("gpu_spec") is None:  # only an inline GPU writes its figures
        del data["hardware"]["gpu_spec"]
    if data["provenance"].get("spec") is None:  # a plan compiled from text records no spec file
        del data["provenance"]["spec"]
    header = f"# shiftplan plan, schema v{plan.schema_version}. Generated by `plan compile`; review with `plan diff`.\n"
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def save_plan(plan: Plan, path: str | Path, spec_file: str | Path | None = None) -> None:
    """Write the canonical file, recording the spec (``spec_file``, default: the one the plan was
    compiled from) relative to ``path``."""
    Path(path).write_text(dump_plan(plan.located(path, spec_file or plan._spec_file)))


def yaml_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic error location (the deepest that exists);
    shared by the spec and the plan file."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                continue  # a union tag such as 'str' or 'GPU': not a YAML key
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a plan file must be a YAML mapping")
    if "schema_version" not in data:
        if {"model", "hardware", "workload"} & set(map(str, data)):
            raise UserError(f"{source}: this is a model.yaml spec, not a plan; compile it first: "
                            f"`plan compile {source} -o NAME.plan.yaml`")
        raise UserError(f"{source}: not a plan file (no schema_version key); plans are written by `plan compile`")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{source}: schema_version {version!r} is not supported (this shiftplan reads {SCHEMA_VERSION})")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        lines = []
        for x in errs[:5]:  # file:line: field path: message, as the spec's errors
            line = yaml_line(root, tuple(x["loc"]))
            path = ".".join(str(p) for p in x["loc"]) or "(top level)"
            lines.append(f"{source}{f':{line}' if line else ''}: {path}: {x['msg'].removeprefix('Value error, ')}")
        more = f"\n  ... and {len(errs) - 5} more" if len(errs) > 5 else ""
        raise UserError("invalid plan:\n  " + "\n  ".join(lines) + more) from None
    except (TypeError, ValueError, RecursionError) as e:  # unhashable keys and the like
        raise UserError(f"{source}: invalid plan: {e}") from None
    try:
        return plan.check()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file: types and ranges of every field, then ``Plan.check``'s
    cross-field arithmetic. Every command that takes a plan reads it through here."""
    p = Path(path)
    text = read_user_text(p, "plan")
    return parse_plan(text, source=str(p))
