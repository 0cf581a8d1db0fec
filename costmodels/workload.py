"""Serving workloads: the requests the simulator replays, synthetic (from a spec) or from a trace.

A ``Workload`` is a recipe; ``Workload.sample(seed)`` turns it into a list of ``Request`` s,
reproducibly (same seed, same requests). ``Workload.with_rate(r)`` re-targets the arrival rate
(a synthetic workload redraws its inter-arrival gaps at rate r; a trace is time-scaled so its
mean rate is r), which is how `plan simulate --rates` sweeps load.

Synthetic (a ``Workload`` of lengths and image mixes; ``planner.inputs.workload_of`` makes one from a spec)::

    inter-arrival gaps ~ Gamma(k = 1/b^2, scale = 1/(rate*k))   (b = burstiness = CV; b = 1: Poisson)
    text tokens, output tokens ~ LogNormal with the LengthDist's mean and cv, rounded, clipped [min, max]
      (sigma^2 = ln(1 + cv^2), mu = ln(mean) - sigma^2/2)
    images per request ~ Categorical(per_request, weights); each image's (width, height) uniform
      over the resolutions, turned into LLM tokens and ViT patches by the model's own rule.

Image tokens count into the request's prompt (prefill) tokens.

Image rule of Qwen2-VL / Qwen2.5-VL (transformers' ``smart_resize``): resize each side to the
nearest multiple of f = patch_size * spatial_merge_size (= 28) keeping the aspect ratio, then,
if the area is outside [min_pixels, max_pixels], rescale by sqrt of the ratio (floor to f when
shrinking, ceil when growing). LLM tokens = (H/28)(W/28); ViT patches = (H/14)(W/14) = 4x that.
Defaults are the image processor's class defaults, min 56*56 = 3,136 and max 28*28*1280 =
1,003,520 pixels (4 to 1,280 tokens per image); a config may override them with ``min_pixels`` /
``max_pixels`` in its ``vision_config``.

Traces (``from_trace``): the format is detected from the CSV header or the JSONL keys
(``TRACE_FORMATS``), so the public traces load as they are:

    Azure LLM 2023/2024          TIMESTAMP, ContextTokens, GeneratedTokens
    Azure LMM 2025 (multimodal)  TIMESTAMP, NumImages, ContextTokens, GeneratedTokens
    BurstGPT                     Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type
    Mooncake / vLLM bench JSONL  {"timestamp": ms, "input_length": n, "output_length": n, ...} per line

Any other CSV needs an arrival (``arrival`` / ``arrival_s`` / ``timestamp`` / ...), input tokens
(``input_tokens`` / ...) and output tokens (``output_tokens`` / ...) column, optionally ``images``;
anything else is a UserError listing the formats and their columns. Timestamps are seconds (JSONL:
milliseconds) or datetimes (ISO, any fraction length); arrivals are made relative to the first. A
request beyond the model's context (input + output) is refused with its line. A trace gives image counts but no resolutions: each image
takes a resolution drawn (seeded) from ``resolutions`` (default 1280x720). ``ContextTokens`` is
taken to include the image tokens (the Azure LMM trace counts the whole context), so a request's
text tokens are ``max(1, input - image tokens)``; pass ``input_includes_images=False`` otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from graph.opgraph import ModelInfo

from plans.errors import UserError, read_user_text

DEFAULT_TRACE_RESOLUTION: tuple[int, int] = (1280, 720)
MAX_TRACE_TOKENS = 10_000_000  # a trace's token counts above this are refused (no model has such a context)


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Request:
    """One request. ``image_tokens[i]`` LLM tokens and ``image_patches[i]`` ViT patches of image i."""

    id: int
    arrival_s: float
    text_tokens: int
    output_tokens: int
    image_tokens: tuple[int, ...] = ()
    image_patches: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        """Prefill tokens: text plus image tokens."""
        return self.text_tokens + sum(self.image_tokens)


# ------------------------------------------------------------------ image -> tokens


@dataclass(frozen=True)
class ImageRule:
    """Turns an image's (width, height) into (LLM tokens, ViT patches)."""

    kind: str  # "qwen2_vl" (28-px grid within [min, max] pixels) or "fixed"
    patch_size: int = 14
    merge: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    fixed_tokens: int = 0
    fixed_patches: int = 0

    def resize(self, width: int, height: int) -> tuple[int, int]:
        """Qwen2-VL ``smart_resize``: (height, width) in pixels, multiples of patch*merge."""
        f = self.patch_size * self.merge
        if max(height, width) / min(height, width) > 200:
            raise UserError(f"image {width}x{height}: aspect ratio above 200 is not supported by the Qwen2-VL processor")
        h = max(f, round(height / f) * f)
        w = max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(f, math.floor(height / beta / f) * f)
            w = max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / f) * f
            w = math.ceil(width * beta / f) * f
        return h, w

    def tokens(self, width: int, height: int) -> tuple[int, int]:
        """(LLM tokens, ViT patches) of one image."""
        if self.kind == "fixed":
            return self.fixed_tokens, self.fixed_patches
        h, w = self.resize(width, height)
        patches = (h // self.patch_size) * (w // self.patch_size)
        return patches // (self.merge * self.merge), patches


def image_rule(info: ModelInfo | None) -> ImageRule | None:
    """The image rule of a model (``graph.opgraph.ModelInfo``), or None for a text-only model.

    Reads ``info.vision`` (patch_size, spatial_merge_size, optional min_pixels / max_pixels,
    or image_tokens for fixed-token encoders such as LLaVA's 576).
    """
    vis = getattr(info, "vision", None)
    if not vis:
        return None
    if vis.get("image_tokens"):
        n = int(vis["image_tokens"])
        return ImageRule(kind="fixed", fixed_tokens=n, fixed_patches=int(vis.get("image_patches", n)))
    return ImageRule(
        kind="qwen2_vl",
        patch_size=int(vis.get("patch_size", 14)),
        merge=int(vis.get("spatial_merge_size", 2)),
        min_pixels=int(vis.get("min_pixels", 56 * 56)),
        max_pixels=int(vis.get("max_pixels", 28 * 28 * 1280)),
    )


# ------------------------------------------------------------------ distributions


@dataclass(frozen=True)
class Lengths:
    """LogNormal with ``mean`` and coefficient of variation ``cv``, rounded, clipped to [lo, hi]."""

    mean: float
    cv: float = 0.5
    lo: int = 1
    hi: int | None = None

    def draw(self, rng: random.Random) -> int:
        if self.cv <= 0:
            x = self.mean
        else:
            s2 = math.log1p(self.cv * self.cv)
            x = rng.lognormvariate(math.log(self.mean) - s2 / 2, math.sqrt(s2))
        n = max(self.lo, int(round(x)))
        return min(n, self.hi) if self.hi is not None else n


def _gaps(rng: random.Random, n: int, rate: float, burstiness: float) -> list[float]:
    """n inter-arrival gaps, mean 1/rate, CV = burstiness (Gamma; exponential at 1)."""
    if burstiness == 1.0:
        return [rng.expovariate(rate) for _ in range(n)]
    k = 1.0 / (burstiness * burstiness)
    return [rng.gammavariate(k, 1.0 / (rate * k)) for _ in range(n)]


# ------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class Workload:
    """A reproducible source of requests: synthetic parameters or a parsed trace."""

    name: str
    rate: float  # mean arrival rate, requests/s
    requests: int  # how many requests ``sample`` returns
    burstiness: float = 1.0
    input_tokens: Lengths | None = None  # synthetic: text tokens
    output_tokens: Lengths | None = None
    image_counts: tuple[int, ...] = (0,)
    image_weights: tuple[float, ...] = (1.0,)
    resolutions: tuple[tuple[int, int], ...] = ()
    rule: ImageRule | None = None
    trace: tuple[Request, ...] | None = None  # a trace's requests at its own timing
    trace_rate: float | None = None  # the trace's own mean rate (requests/s)
    seed: int = 0
    notes: tuple[str, ...] = field(default=())
    trace_format: str | None = None  # the detected format of a trace (``TRACE_FORMATS``)

    @property
    def multimodal(self) -> bool:
        if self.trace is not None:
            return any(r.image_tokens for r in self.trace)
        return any(c > 0 for c, w in zip(self.image_counts, self.image_weights) if w > 0) and self.rule is not None

    def with_rate(self, rate: float) -> "Workload":
        """The same traffic at mean arrival rate ``rate`` (requests/s)."""
        if not rate > 0:
            raise UserError(f"arrival rate must be > 0 requests/s, got {rate}")
        return replace(self, rate=float(rate))

    def with_requests(self, n: int) -> "Workload":
        if n < 1:
            raise UserError(f"number of requests must be >= 1, got {n}")
        return replace(self, requests=int(n))

    def sample(self, seed: int | None = None) -> list[Request]:
        """The requests, sorted by arrival; the same seed gives the same list."""
        seed = self.seed if seed is None else seed
        if self.trace is not None:
            return self._sample_trace()
        rng = random.Random(seed)
        gaps = _gaps(rng, self.requests, self.rate, self.burstiness)
        t = 0.0
        out: list[Request] = []
        for i, g in enumerate(gaps):
            t += g if i else 0.0
            n_img = rng.choices(self.image_counts, weights=self.image_weights)[0] if self.rule else 0
            toks, pats = [], []
            for _ in range(n_img):
                w, h = rng.choice(self.resolutions)
                a, b = self.rule.tokens(w, h)
                toks.append(a)
                pats.append(b)
            out.append(Request(i, t, self.input_tokens.draw(rng), self.output_tokens.draw(rng), tuple(toks), tuple(pats)))
        return out

    def _sample_trace(self) -> list[Request]:
        reqs = list(self.trace)[: self.requests]
        scale = (self.trace_rate or self.rate) / self.rate  # time-scale the trace to the target rate
        return [replace(r, arrival_s=r.arrival_s * scale) for r in reqs]


# ------------------------------------------------------------------ builders


def image_caps(rule: ImageRule | None, resolutions: Sequence[tuple[int, int]]) -> list[str]:
    """A note per resolution the image processor resizes past its pixel bounds (clipped to
    ``max_pixels`` or raised to ``min_pixels``): the workload asks for more (or less) than the model sees."""
    if rule is None or rule.kind != "qwen2_vl":
        return []
    out = []
    for w, h in dict.fromkeys(tuple(r) for r in resolutions):
        rh, rw = rule.resize(w, h)
        tokens, _ = rule.tokens(w, h)
        if w * h > rule.max_pixels:
            out.append(f"images of {w}x{h} are resized to {rw}x{rh} ({tokens} tokens): above the model's "
                       f"max_pixels {rule.max_pixels:,}")
        elif w * h < rule.min_pixels:
            out.append(f"images of {w}x{h} are resized to {rw}x{rh} ({tokens} tokens): below the model's "
                       f"min_pixels {rule.min_pixels:,}")
    return out


def check_context(name: str, info: Any, text: Any, output: Any, counts: Sequence[int], weights: Sequence[float],
                  image_tokens: Sequence[int]) -> None:
    """Refuse a synthetic workload whose largest request is beyond the model's context, with the
    arithmetic: text tokens (the LengthDist's max, else its mean) + images x tokens per image +
    output tokens (max, else mean) > ``info.max_context``."""
    ctx = int(getattr(info, "max_context", 0) or 0)
    if not ctx:
        return
    t_in = text.max if text.max is not None else math.ceil(text.mean)
    t_out = output.max if output.max is not None else math.ceil(output.mean)
    n_img = max((c for c, w in zip(counts, weights) if w > 0), default=0)
    per_img = max(image_tokens, default=0)
    total = t_in + n_img * per_img + t_out
    if total > ctx:
        img = f" + {n_img} images x {per_img} tokens" if n_img and per_img else ""
        which = lambda d, what: f"{what} {'max' if d.max is not None else 'mean'}"  # noqa: E731
        raise UserError(f"spec {name}: the largest request, {t_in} {which(text, 'input_tokens')}{img} + {t_out} "
                        f"{which(output, 'output_tokens')} = {total} tokens, is beyond the model's context of {ctx} "
                        "tokens; lower the token lengths or the images per request")


@dataclass(frozen=True)
class TraceFormat:
    """A trace format people already have: its columns (CSV header or JSONL keys, in the format's
    own order), which of them are read, and the unit of numeric timestamps."""

    name: str
    columns: tuple[str, ...]
    arrival: str
    input: str
    output: str
    images: str | None = None
    seconds_per_unit: float = 1.0  # numeric timestamps: seconds per unit (ms: 1e-3)
    jsonl: bool = False

    def matches(self, keys: Sequence[str]) -> bool:
        """Whether a header (or a JSON object's keys) has every column this format reads."""
        have = {k.strip().lower() for k in keys}
        return all(c.lower() in have for c in (self.arrival, self.input, self.output, self.images) if c)


# Most specific first: a header is read as the first format whose columns it has.
TRACE_FORMATS: tuple[TraceFormat, ...] = (
    TraceFormat("Azure LMM 2025 (multimodal)", ("TIMESTAMP", "NumImages", "ContextTokens", "GeneratedTokens"),
                "TIMESTAMP", "ContextTokens", "GeneratedTokens", images="NumImages"),
    TraceFormat("Azure LLM 2023/2024", ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
                "TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    TraceFormat("BurstGPT", ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"),
                "Timestamp", "Request tokens", "Response tokens"),
    TraceFormat("Mooncake / vLLM bench JSONL", ("timestamp", "input_length", "output_length"),
                "timestamp", "input_length", "output_length", seconds_per_unit=1e-3, jsonl=True),
)

# Plain CSV columns (any of the names per role), for traces written by hand or by other tools.
_ALIASES = {
    "arrival": ("TIMESTAMP", "timestamp", "arrival", "arrival_s", "arrival_time", "time"),
    "input": ("ContextTokens", "input_tokens", "input", "prompt_tokens", "context_tokens"),
    "output": ("GeneratedTokens", "output_tokens", "output", "generated_tokens"),
    "images": ("NumImages", "images", "num_images", "image_count"),
}


def _expected() -> str:
    known = "; ".join(f"{f.name}: {', '.join(f.columns)}" + (" (timestamp in ms)" if f.jsonl else "")
                      for f in TRACE_FORMATS)
    plain = ", ".join(f"{role} ({' / '.join(names[1:3])})" for role, names in _ALIASES.items())
    return f"expected one of these formats: {known}; or a plain CSV with columns {plain}"


def _column(header: list[str], role: str, path: Path, required: bool) -> int | None:
    low = {h.strip().lower(): i for i, h in enumerate(header)}
    for name in _ALIASES[role]:
        if name.lower() in low:
            return low[name.lower()]
    if required:
        raise UserError(f"{path}: no {role} column (header: {', '.join(header)}); expected one of "
                        f"{', '.join(_ALIASES[role])}. {_expected()}")
    return None


def _seconds(text: str, path: Path, line: int, unit: float = 1.0) -> float:
    s = text.strip()
    try:
        v = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(v) or abs(v * unit) > 1e11:  # ~3,000 years: a clock, not a number of seconds
            raise UserError(f"{path}:{line}: arrival '{text}' is not a usable time")
        return v * unit
    s2 = s.replace("T", " ").rstrip("Z")
    if "." in s2:  # Python parses at most 6 fraction digits; the Azure trace has 7
        head, frac = s2.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        s2 = f"{head}.{(digits + '000000')[:6]}"
    try:
        return datetime.fromisoformat(s2).timestamp()
    except (ValueError, OverflowError, OSError):
        raise UserError(f"{path}:{line}: arrival '{text}' is neither seconds nor a date-time") from None


def _int(text: str, path: Path, line: int, col: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{path}:{line}: {col} '{text}' is not a number") from None
    if v < 0 or not math.isfinite(v):
        raise UserError(f"{path}:{line}: {col} must be >= 0, got {text}")
    if v > MAX_TRACE_TOKENS:
        raise UserError(f"{path}:{line}: {col} {text} is beyond any model's context ({MAX_TRACE_TOKENS:,} tokens)")
    return int(round(v))


def _read_text(p: Path) -> str:
    return read_user_text(p, "trace", encoding="utf-8-sig")  # Excel writes a byte-order mark


Row = tuple[int, str, str, str, str]  # line, arrival, input tokens, output tokens, images ("" = none)


def read_trace(path: str | Path) -> tuple[str, float, list[Row], tuple[str, str, str]]:
    """(format name, seconds per numeric time unit, rows, column names of input/output/images) of a
    trace file, its format detected from the CSV header or the JSONL keys (``TRACE_FORMATS``)."""
    p = Path(path)
    text = _read_text(p)
    if text.lstrip().startswith("{"):
        return _read_jsonl(p, text)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise UserError(f"{p}: cannot read as CSV: {e}") from None
    rows = [(n, r) for n, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UserError(f"{p}: a trace needs a header line and at least one request")
    header = [h.strip() for h in rows[0][1]]
    fmt = next((f for f in TRACE_FORMATS if not f.jsonl and f.matches(header)), None)
    if fmt is not None:
        low = {h.lower(): i for i, h in enumerate(header)}
        ia, ii, io_ = (low[c.lower()] for c in (fmt.arrival, fmt.input, fmt.output))
        im = low[fmt.images.lower()] if fmt.images else None
        name, unit = fmt.name, fmt.seconds_per_unit
    else:
        ia, ii, io_ = (_column(header, k, p, True) for k in ("arrival", "input", "output"))
        im = _column(header, "images", p, False)
        name, unit = "CSV", 1.0
    out: list[Row] = []
    for n, row in rows[1:]:
        if len(row) < len(header):
            raise UserError(f"{p}:{n}: {len(row)} fields, the header has {len(header)}")
        out.append((n, row[ia], row[ii], row[io_], row[im] if im is not None else ""))
    cols = (header[ii], header[io_], header[im] if im is not None else "images")
    return name, unit, out, cols


def _read_jsonl(p: Path, text: str) -> tuple[str, float, list[Row], tuple[str, str, str]]:
    fmt = next(f for f in TRACE_FORMATS if f.jsonl)
    out: list[Row] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{p}:{n}: not a JSON object: {e}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{p}:{n}: each line must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in (fmt.arrival, fmt.input, fmt.output) if k not in obj]
        if missing:
            raise UserError(f"{p}:{n}: no {', '.join(missing)} key (keys: {', '.join(map(str, obj)) or 'none'}). "
                            f"{_expected()}")
        vals = [obj[k] for k in (fmt.arrival, fmt.input, fmt.output)]
        if any(isinstance(v, (bool, dict, list)) or v is None for v in vals):
            raise UserError(f"{p}:{n}: {fmt.arrival}, {fmt.input} and {fmt.output} must be numbers")
        out.append((n, *(str(v) for v in vals), ""))
    if not out:
        raise UserError(f"{p}: a trace needs at least one request")
    return fmt.name, fmt.seconds_per_unit, out, (fmt.input, fmt.output, "images")


def from_trace(path: str | Path, *, info: ModelInfo | None = None, resolutions: Sequence[tuple[int, int]] | None = None,
               input_includes_images: bool = True, seed: int = 0, rate: float | None = None) -> Workload:
    """A workload replaying a trace (see the module doc for formats and image handling).

    ``rate`` re-targets the mean arrival rate (time-scaling); default: the trace's own rate.
    """
    p = Path(path)
    fmt, unit, rows, (c_in, c_out, c_img) = read_trace(p)
    raw: list[tuple[float, int, int, int]] = []
    for n, t, inp, out, img in rows:
        n_img = _int(img, p, n, c_img) if img.strip() else 0
        raw.append((_seconds(t, p, n, unit), _int(inp, p, n, c_in), _int(out, p, n, c_out), n_img))
    max_ctx = int(getattr(info, "max_context", 0) or 0)
    if max_ctx:
        for (n, *_), (_t, inp, out, _i) in zip(rows, raw):
            if inp + out > max_ctx:
                raise UserError(f"{p}:{n}: a request of {inp} input + {out} output = {inp + out} tokens is beyond "
                                f"the model's context of {max_ctx} tokens")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    notes: list[str] = []
    rule = image_rule(info) if info is not None else None
    res = tuple(resolutions) if resolutions else (DEFAULT_TRACE_RESOLUTION,)
    rng = random.Random(seed)
    if rule is None and any(r[3] for r in raw):
        notes.append(f"{p.name}: image counts ignored (the model has no vision tower)")
    reqs: list[Request] = []
    for i, (t, inp, out, n_img) in enumerate(raw):
        toks, pats = [], []
        if rule is not None:
            for _ in range(n_img):
                a, b = rule.tokens(*rng.choice(res))
                toks.append(a)
                pats.append(b)
        text = max(1, inp - sum(toks)) if input_includes_images else max(1, inp)
        reqs.append(Request(i, t - t0, text, max(1, out), tuple(toks), tuple(pats)))
    span = reqs[-1].arrival_s
    native = (len(reqs) - 1) / span if span > 0 else 1.0
    return Workload(name=p.stem, rate=float(rate or native), requests=len(reqs), trace=tuple(reqs), trace_rate=native,
                    rule=rule, seed=seed, notes=tuple(notes), resolutions=res, trace_format=fmt)
