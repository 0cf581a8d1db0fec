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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plans.errors import UserError
from plans.mesh import AXES, AxisName, ParallelDims, VisionPlacement, mesh_label

SCHEMA_VERSION = 1

Backend = Literal["eager", "compile", "tensorrt"]
Engine = Literal["shiftplan", "vllm", "arctic", "sglang"]  # what runs the plan (spec field `engine`)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Provenance(_Model):
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
    num_layers: int
    vision_blocks: int = 0


class Hardware(_Model):
    gpu: str
    gpus_per_node: int
    nodes: int

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


class Mesh(_Model):
    """Parallel degrees. GPUs used by the LLM = dp*pp*tp*sp (dedicated vision GPUs aside)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    axis_order: list[AxisName] = Field(default_factory=lambda: list(AXES))

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

    index: int
    first_layer: int
    last_layer: int
    embedding: bool = False  # holds the token embedding
    lm_head: bool = False  # holds final norm + lm_head
    vision: bool = False  # the vision encoder runs on this stage's GPUs (``ParallelDims.encoder_stages``)
    step_ms: float | None = None  # predicted time of the reference step on this stage
    shift_threshold_tokens: int | None = None  # this stage's own SP x TP vs TP crossover - 1 (sp > 1)

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer + 1


class Vision(_Model):
    placement: VisionPlacement = "none"
    dedicated_gpus: int = 0  # GPUs given to the encoder alone (placement == dedicated)


class CurvePoint(_Model):
    tokens: int
    sp_tp_ms: float
    tp_ms: float


class Shift(_Model):
    """Shift parallelism: steps of at most ``threshold_tokens`` tokens run as plain TP of
    degree tp*sp; larger steps run SP x TP. ``curves`` shows why (per stage 0 by default)."""

    enabled: bool = False
    threshold_tokens: int | None = None
    curves: list[CurvePoint] = Field(default_factory=list)


class MemoryPerGPU(_Model):
    """GB (1e9 bytes) per GPU of the most loaded stage."""

    weights: float
    shift_copy: float = 0.0
    kv: float
    activations: float
    total: float
    capacity: float
    kv_tokens: int  # KV cache capacity in tokens, per replica


class Scheduler(_Model):
    max_batch_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    max_seqs: int = 256
    block_size: int = 16  # paged KV cache block, tokens
    microbatches: int = 1  # pipeline micro-batches in flight


class Percentiles(_Model):
    p50: float
    p90: float
    p99: float


class Predicted(_Model):
    source: Literal["simulator", "estimate"] = "estimate"
    ttft_ms: Percentiles | None = None
    tpot_ms: Percentiles | None = None
    output_tok_s: float | None = None
    combined_tok_s: float | None = None
    goodput_rps: float | None = None
    shift_tp_fraction: float | None = None
    meets_slo: bool | None = None


class RunnerUp(_Model):
    mesh: str  # e.g. "tp4xsp2", "pp2xtp4"
    vision: VisionPlacement = "none"
    score: float | None = None
    reason: str  # why it lost, with figures


class Plan(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
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

    def check(self) -> "Plan":
        """Validate the cross-field arithmetic; raise UserError naming what is off."""
        if len(self.stages) != self.mesh.pp:
            raise UserError(f"plan {self.name}: mesh.pp = {self.mesh.pp} but {len(self.stages)} stages are listed")
        expect = 0
        for st in self.stages:
            if st.first_layer != expect or st.last_layer < st.first_layer:
                raise UserError(
                    f"plan {self.name}: stage {st.index} covers layers {st.first_layer}-{st.last_layer}; "
                    f"stages must be contiguous from layer {expect}"
                )
            expect = st.last_layer + 1
        if expect != self.model.num_layers:
            raise UserError(f"plan {self.name}: stages cover {expect} layers, the model has {self.model.num_layers}")
        dims = self.dims()
        want = dims.encoder_stages()
        have = tuple(i for i, st in enumerate(self.stages) if st.vision)
        if have != want:
            raise UserError(f"plan {self.name}: stages {list(have)} have vision: true; vision.placement "
                            f"{self.vision.placement} with model.vision_blocks = {self.model.vision_blocks} runs the "
                            f"encoder on stages {list(want)}")
        return self

    def dims(self) -> ParallelDims:
        """The parallel arithmetic of this plan (``plans.mesh``); UserError when it does not add up."""
        return ParallelDims.from_plan(self)


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
    header = f"# shiftplan plan, schema v{plan.schema_version}. Generated by `plan compile`; review with `plan diff`.\n"
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def save_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(dump_plan(plan))


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a plan file must be a YAML mapping")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{source}: schema_version {version!r} is not supported (this shiftplan reads {SCHEMA_VERSION})")
    try:
        return Plan.model_validate(data).check()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{source}: {loc}: {first['msg']}") from None


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan file not found: {p}")
    return parse_plan(p.read_text(), source=str(p))
