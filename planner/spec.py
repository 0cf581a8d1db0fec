"""model.yaml: the user's spec, validated by pydantic v2 with errors that name the field path
and the YAML line.

    load_spec(path) -> Spec        raises SpecError (a UserError) on anything malformed

Field names are the public contract of DESIGN.md section 4.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from costmodels.gpu import GPU
from graph.hf_config import nearest, preset_names
from plans.errors import UserError
from plans.mesh import EncoderPlacement
from plans.schema import Engine

if TYPE_CHECKING:
    from costmodels.simulator.metrics import SloTargets

Dtype = Literal["bf16", "fp16", "fp32", "fp8", "int4"]
KvDtype = Literal["bf16", "fp16", "fp32", "fp8"]
Objective = Literal["max_throughput", "min_latency", "balanced", "min_gpus"]
Placement = EncoderPlacement


class SpecError(UserError):
    """A malformed spec; the message names the file, the field path and the line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    gpus_per_node: int = Field(8, ge=1, le=64)
    nodes: int = Field(1, ge=1, le=1024)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


class LengthDist(_Strict):
    """Token-length distribution: lognormal-ish around ``mean``, clipped to [min, max]."""

    mean: float = Field(gt=0)
    max: int | None = Field(None, gt=0)
    min: int = Field(1, ge=1)
    cv: float = Field(0.5, ge=0)  # coefficient of variation

    @model_validator(mode="after")
    def _ordered(self) -> "LengthDist":
        if self.max is not None and not (self.min <= self.mean <= self.max):
            raise ValueError(f"need min <= mean <= max, got {self.min} <= {self.mean} <= {self.max}")
        return self


class ImagesSection(_Strict):
    per_request: list[int] = Field(min_length=1)  # image counts, e.g. [0, 1, 2]
    weights: list[float] | None = None  # probability of each count
    resolution: list[tuple[int, int]] = Field(min_length=1)  # [width, height] choices, uniform

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
    arrival_rate: float | None = Field(None, gt=0)  # requests/s, Poisson
    burstiness: float = Field(1.0, gt=0)  # gamma inter-arrival CV; 1.0 = Poisson
    trace: str | None = None  # CSV path, relative to the spec's folder
    input_tokens: LengthDist = LengthDist(mean=1024)
    output_tokens: LengthDist = LengthDist(mean=256)
    images: ImagesSection | None = None
    requests: int = Field(2000, ge=1)  # synthetic requests the simulator draws
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "WorkloadSection":
        if (self.arrival_rate is None) == (self.trace is None):
            raise ValueError("give exactly one of 'arrival_rate' or 'trace'")
        return self


class SloSection(_Strict):
    ttft_p90_ms: float | None = Field(None, gt=0)
    tpot_p90_ms: float | None = Field(None, gt=0)

    def targets(self) -> "SloTargets":
        """The simulator's view of these targets."""
        from costmodels.simulator.metrics import SloTargets

        return SloTargets(self.ttft_p90_ms, self.tpot_p90_ms)


class SearchSection(_Strict):
    """Limits on the search space; a single value pins that part of the plan."""

    dp: list[int] | None = None
    pp: list[int] | None = None
    tp: list[int] | None = None
    sp: list[int] | None = None
    vision_placement: list[Placement] | None = None
    dedicated_vision_gpus: list[int] | None = None
    shift_threshold: int | None = Field(None, ge=0)  # pin the threshold instead of deriving it
    stages: list[tuple[int, int]] | None = None  # pin stage layer ranges (inclusive)
    allow_cross_node_tp: bool = False
    max_batch_tokens: int = Field(8192, ge=16)
    max_seqs: int = Field(256, ge=1)

    @field_validator("dp", "pp", "tp", "sp", "dedicated_vision_gpus")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(x < 1 for x in v)):
            raise ValueError("must be a non-empty list of integers >= 1")
        return v


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
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic error location (the deepest that exists)."""
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
    for reserved in ("base_dir", "sha256"):
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
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read: {e}") from None
    return parse_spec(text, source=str(p), base_dir=p.parent)
