"""model.yaml: the user's spec, validated by pydantic v2 with errors that name the field path
and the YAML line.

    load_spec(path) -> Spec        raises SpecError (a UserError) on anything malformed

Field names are the public contract of DESIGN.md section 4.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from costmodels.gpu import GPU
from graph.hf_config import nearest, preset_names
from plans.errors import UserError, read_user_text
from plans.mesh import EncoderPlacement
from plans.numbers import Float as Num
from plans.numbers import Int
from plans.schema import Engine
from plans.schema import yaml_line as _line_of

if TYPE_CHECKING:
    from costmodels.simulator.metrics import SloTargets

Dtype = Literal["bf16", "fp16", "fp32", "fp8", "int4"]
KvDtype = Literal["bf16", "fp16", "fp32", "fp8"]
Objective = Literal["max_throughput", "min_latency", "balanced", "min_gpus"]
Placement = EncoderPlacement


class SpecError(UserError):
    """A malformed spec; the message names the file, the field path and the line."""


# Numbers refuse booleans (plans.numbers); nothing takes NaN or infinity (``allow_inf_nan=False``).
# The upper bounds refuse the absurd before it costs minutes.
MAX_TOKENS = 10_000_000  # a request's tokens: above any model's context
MAX_REQUESTS = 200_000  # requests one simulation draws (about 6 s of simulator time for a small model)
MAX_RATE = 1e6  # requests/s
MIN_RATE = 1e-6  # requests/s (one in 11 days); slower, arrival times lose the milliseconds of a step


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Strict):
    preset: str | None = None
    config: str | None = None  # HF config file or checkpoint dir, relative to the spec's folder
    weights_dtype: Dtype = "bf16"
    kv_dtype: KvDtype = "bf16"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.preset is None) == (self.config is None):
            raise ValueError("give exactly one of 'preset' or 'config'")
        if self.preset is not None and self.preset not in preset_names():
            raise ValueError(f"unknown preset '{self.preset}'{nearest(self.preset, preset_names())}; "
                             f"presets: {', '.join(preset_names())}")
        return self


class HardwareSection(_Strict):
    gpu: str | GPU  # catalog name or an inline GPU
    gpus_per_node: Int = Field(8, ge=1, le=64)
    nodes: Int = Field(1, ge=1, le=1024)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


class LengthDist(_Strict):
    """Token-length distribution: lognormal-ish around ``mean``, clipped to [min, max]."""

    mean: Num = Field(gt=0, le=MAX_TOKENS)
    max: Int | None = Field(None, gt=0, le=MAX_TOKENS)
    min: Int = Field(1, ge=1, le=MAX_TOKENS)
    cv: Num = Field(0.5, ge=0, le=100)  # coefficient of variation

    @model_validator(mode="after")
    def _ordered(self) -> "LengthDist":
        if self.max is not None and not (self.min <= self.mean <= self.max):
            raise ValueError(f"need min <= mean <= max, got {self.min} <= {self.mean} <= {self.max}")
        if self.mean < self.min:
            raise ValueError(f"need min <= mean, got {self.min} <= {self.mean}")
        return self


class ImagesSection(_Strict):
    per_request: list[Annotated[Int, Field(le=1000)]] = Field(min_length=1)  # image counts, e.g. [0, 1, 2]
    weights: list[Num] | None = None  # probability of each count
    resolution: list[tuple[Annotated[Int, Field(le=100_000)], Annotated[Int, Field(le=100_000)]]] = Field(
        min_length=1)  # [width, height] choices, uniform

    @field_validator("per_request")
    @classmethod
    def _nonneg(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("image counts must be >= 0")
        return v

    @field_validator("resolution")
    @classmethod
    def _positive(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(w <= 0 or h <= 0 for w, h in v):
            raise ValueError("resolutions must be positive [width, height]")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "ImagesSection":
        if self.weights is not None:
            if len(self.weights) != len(self.per_request):
                raise ValueError(f"'weights' has {len(self.weights)} entries, 'per_request' has {len(self.per_request)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("'weights' must be non-negative and not all zero")
        return self


class WorkloadSection(_Strict):
    arrival_rate: Num | None = Field(None, ge=MIN_RATE, le=MAX_RATE)  # requests/s, Poisson
    burstiness: Num = Field(1.0, ge=0.01, le=100)  # gamma inter-arrival CV; 1.0 = Poisson
    trace: str | None = None  # CSV path, relative to the spec's folder
    input_tokens: LengthDist = LengthDist(mean=1024)
    output_tokens: LengthDist = LengthDist(mean=256)
    images: ImagesSection | None = None
    requests: Int = Field(2000, ge=1, le=MAX_REQUESTS)  # synthetic requests the simulator draws
    seed: Int = Field(0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _one_source(self) -> "WorkloadSection":
        if (self.arrival_rate is None) == (self.trace is None):
            raise ValueError("give exactly one of 'arrival_rate' or 'trace'")
        return self


class SloSection(_Strict):
    ttft_p90_ms: Num | None = Field(None, gt=0)
    tpot_p90_ms: Num | None = Field(None, gt=0)

    def targets(self) -> "SloTargets":
        """The simulator's view of these targets."""
        from costmodels.simulator.metrics import SloTargets

        return SloTargets(self.ttft_p90_ms, self.tpot_p90_ms)


class SearchSection(_Strict):
    """Limits on the search space; a single value pins that part of the plan."""

    dp: list[Int] | None = None
    pp: list[Int] | None = None
    tp: list[Int] | None = None
    sp: list[Int] | None = None
    vision_placement: list[Placement] | None = None
    dedicated_vision_gpus: list[Int] | None = None
    shift_threshold: Int | None = Field(None, ge=0, le=MAX_TOKENS)  # pin the threshold instead of deriving it
    stages: list[tuple[Int, Int]] | None = None  # pin stage layer ranges (inclusive)
    allow_cross_node_tp: bool = False
    max_batch_tokens: Int = Field(8192, ge=16, le=MAX_TOKENS)
    max_seqs: Int = Field(256, ge=1, le=100_000)

    @field_validator("dp", "pp", "tp", "sp", "dedicated_vision_gpus")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(x < 1 or x > 65536 for x in v)):
            raise ValueError("must be a non-empty list of integers from 1 to 65536")
        return v

    @field_validator("stages")
    @classmethod
    def _ranges(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one [first_layer, last_layer] range")
        expect = 0
        for i, (a, b) in enumerate(v):
            if a != expect or b < a:
                raise ValueError(f"stage {i} is [{a}, {b}]; ranges must be contiguous from layer {expect} "
                                 "with first <= last")
            expect = b + 1
        return v

    @model_validator(mode="after")
    def _pins_agree(self) -> "SearchSection":
        """Pins that contradict each other, or that cannot apply, are refused (not ignored)."""
        if self.shift_threshold is not None and self.sp is not None and max(self.sp) < 2:
            raise ValueError(f"shift_threshold {self.shift_threshold} is pinned but sp is pinned to {self.sp}: "
                             "shift needs sp >= 2 (drop shift_threshold or allow sp >= 2)")
        if self.stages is not None and self.pp is not None and len(self.stages) not in self.pp:
            raise ValueError(f"stages pins {len(self.stages)} pipeline stages but pp is pinned to {self.pp}")
        if self.dedicated_vision_gpus is not None and self.vision_placement is not None \
                and "dedicated" not in self.vision_placement:
            raise ValueError(f"dedicated_vision_gpus {self.dedicated_vision_gpus} is pinned but vision_placement "
                             f"{self.vision_placement} has no 'dedicated'")
        return self


class RuntimeSection(_Strict):
    backend: Literal["eager", "compile", "tensorrt"] = "eager"


class Spec(_Strict):
    name: str = Field(min_length=1)
    model: ModelSection
    hardware: HardwareSection
    workload: WorkloadSection
    objective: Objective = "max_throughput"
    engine: Engine = "shiftplan"  # restrict the search to what this engine runs (vllm | arctic | sglang)
    slo: SloSection = SloSection()
    search: SearchSection = SearchSection()
    runtime: RuntimeSection = RuntimeSection()

    # Where the spec came from: relative paths (model.config, workload.trace) resolve here.
    base_dir: str = Field(".", exclude=True)
    sha256: str = Field("", exclude=True)
    path: str = Field("", exclude=True)  # the spec file (absolute), "" for a spec parsed from text

    def resolve(self, relpath: str) -> Path:
        p = Path(relpath)
        return p if p.is_absolute() else Path(self.base_dir) / p


# ------------------------------------------------------------------ loading with line numbers


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent overwrite hides typos)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # `? [a, b]`: a list or a mapping as a key
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name, got a {type(key).__name__}", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the (sub)model an unknown key was found in."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            continue
        ann = fields[part].annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
        if current is None:
            return []
    return [n for n, f in getattr(current, "model_fields", {}).items() if not f.exclude]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or p in ("str", "int", "float"))
                                        or isinstance(p, str) and "[" in p))


def _describe(err: dict[str, Any], root: yaml.Node | None, source: str) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in _clean_loc(loc)) or "(top level)"
    line = _line_of(root, loc)
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(Spec, loc)
        return f"{where}: {path}: unknown key '{key}'{nearest(key, valid)}; valid keys here: {', '.join(valid)}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{where}: {path}: {msg}"


def parse_spec(text: str, source: str = "<spec>", base_dir: str | Path = ".") -> Spec:
    """Parse and validate spec text; raise SpecError with file:line and field path."""
    try:
        root = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{source}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nested too deeply") from None
    if data is None:
        raise SpecError(f"{source}: the file is empty; a spec must be a YAML mapping with keys name, model, "
                        "hardware, workload, ...")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with keys name, model, hardware, workload, ...; "
                        f"got {type(data).__name__}")
    if "schema_version" in data and "provenance" in data:
        raise SpecError(f"{source}: this is a compiled plan, not a model.yaml spec; `plan show`, `plan simulate`, "
                        "`plan run` and `plan diff` read plans")
    for reserved in ("base_dir", "sha256", "path"):
        if reserved in data:
            line = _line_of(root, (reserved,))
            raise SpecError(f"{source}:{line}: {reserved}: unknown key '{reserved}'")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        # ``gpu: str | GPU`` given a mapping: the str branch's complaint is noise
        errs = [x for x in errs if not (x["type"] == "string_type" and isinstance(x.get("input"), dict))] or errs
        lines = [_describe(err, root, source) for err in errs[:5]]
        more = f"\n  ... and {len(errs) - 5} more" if len(errs) > 5 else ""
        raise SpecError("invalid spec:\n  " + "\n  ".join(lines) + more) from None
    except (TypeError, ValueError) as e:  # unhashable keys and the like
        raise SpecError(f"{source}: invalid spec: {e}") from None
    sha = hashlib.sha256(text.encode()).hexdigest()
    return spec.model_copy(update={"base_dir": str(base_dir), "sha256": sha})


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    try:
        text = read_user_text(p, "spec")
    except UserError as e:
        raise SpecError(str(e)) from None
    spec = parse_spec(text, source=str(p), base_dir=p.parent)
    return spec.model_copy(update={"path": str(p.resolve())})
