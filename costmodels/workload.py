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

Trace CSV (``from_trace``): columns for arrival, input tokens, output tokens and (optional) image
count. The public Azure LLM/LMM trace columns ``TIMESTAMP, ContextTokens, GeneratedTokens,
NumImages`` load as they are; so do ``arrival`` (or ``arrival_s`` / ``timestamp``), ``input_tokens``,
``output_tokens``, ``images``. Timestamps are seconds or datetimes (ISO, any fraction length);
arrivals are made relative to the first. A trace gives image counts but no resolutions: each image
takes a resolution drawn (seeded) from ``resolutions`` (default 1280x720). ``ContextTokens`` is
taken to include the image tokens (the Azure LMM trace counts the whole context), so a request's
text tokens are ``max(1, input - image tokens)``; pass ``input_includes_images=False`` otherwise.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Sequence

from graph.opgraph import ModelInfo
from plans.errors import UserError

DEFAULT_TRACE_RESOLUTION: tuple[int, int] = (1280, 720)


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


_ALIASES = {
    "arrival": ("TIMESTAMP", "timestamp", "arrival", "arrival_s", "arrival_time", "time"),
    "input": ("ContextTokens", "input_tokens", "input", "prompt_tokens", "context_tokens"),
    "output": ("GeneratedTokens", "output_tokens", "output", "generated_tokens"),
    "images": ("NumImages", "images", "num_images", "image_count"),
}


def _column(header: list[str], role: str, path: Path, required: bool) -> int | None:
    low = {h.strip().lower(): i for i, h in enumerate(header)}
    for name in _ALIASES[role]:
        if name.lower() in low:
            return low[name.lower()]
    if required:
        raise UserError(f"{path}: no {role} column; expected one of {', '.join(_ALIASES[role])} "
                        f"(header: {', '.join(header)})")
    return None


def _seconds(text: str, path: Path, line: int) -> float:
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    s2 = s.replace("T", " ").rstrip("Z")
    if "." in s2:  # Python parses at most 6 fraction digits; the Azure trace has 7
        head, frac = s2.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        s2 = f"{head}.{(digits + '000000')[:6]}"
    try:
        return datetime.fromisoformat(s2).timestamp()
    except ValueError:
        raise UserError(f"{path}:{line}: arrival '{text}' is neither seconds nor a date-time") from None


def _int(text: str, path: Path, line: int, col: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{path}:{line}: {col} '{text}' is not a number") from None
    if v < 0 or not math.isfinite(v):
        raise UserError(f"{path}:{line}: {col} must be >= 0, got {text}")
    return int(round(v))


def from_trace(path: str | Path, *, info: ModelInfo | None = None, resolutions: Sequence[tuple[int, int]] | None = None,
               input_includes_images: bool = True, seed: int = 0, rate: float | None = None) -> Workload:
    """A workload replaying a CSV trace (see the module doc for columns and image handling).

    ``rate`` re-targets the mean arrival rate (time-scaling); default: the trace's own rate.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"trace file not found: {p}")
    try:
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{p}: cannot read as CSV: {e}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UserError(f"{p}: a trace needs a header line and at least one request")
    header = rows[0]
    ia, ii, io = (_column(header, k, p, True) for k in ("arrival", "input", "output"))
    im = _column(header, "images", p, False)
    rule = image_rule(info) if info is not None else None
    res = tuple(resolutions) if resolutions else (DEFAULT_TRACE_RESOLUTION,)
    rng = random.Random(seed)
    notes: list[str] = []
    raw: list[tuple[float, int, int, int]] = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < len(header):
            raise UserError(f"{p}:{n}: {len(row)} fields, the header has {len(header)}")
        n_img = _int(row[im], p, n, header[im]) if im is not None and row[im].strip() else 0
        raw.append((_seconds(row[ia], p, n), _int(row[ii], p, n, header[ii]), _int(row[io], p, n, header[io]), n_img))
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
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
                    rule=rule, seed=seed, notes=tuple(notes), resolutions=res)
