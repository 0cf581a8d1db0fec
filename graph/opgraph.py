"""The op graph: what the tracer produces and the cost model consumes.

Work of a forward step is described by four numbers (a ``StepShape``):

* ``tokens``  T -- tokens processed in the step (prefill chunk tokens + one per decode);
* ``pairs``   S -- attention (query, key) pairs: sum over the step's tokens of the context
  each attends to. A causal prefill of L new tokens on a fresh sequence has L(L+1)/2; a
  decode at context c has c. Vision attention over an image of n patches has n*n;
* ``kv``      K -- KV-cache tokens read by attention: sum over the step's sequences of their
  context length (each sequence's keys/values are read once per step, flash-style);
* ``seqs``    B -- sequences (or images, for vision blocks) in the step.

Each op's FLOPs, bytes read and bytes written are affine in those four numbers
(``Affine``), in *elements* for memory so the caller applies its dtypes:
``bytes_read = weight_elems * w_bytes + act_read(shape) * a_bytes + kv_read(shape) * kv_bytes``.

``shard`` says how tensor parallelism of degree t splits the op (the cost model divides
the op's work by t for ``column``/``row``/``heads``/``vocab`` and not for ``replicated``);
under Ulysses SP of degree s every op's token work is divided by s, attention by heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import networkx as nx

OpKind = Literal[
    "matmul", "attention", "norm", "rope", "activation", "elementwise",
    "embedding", "lm_head", "patch_embed", "merger",
]
BlockKind = Literal[
    "embedding", "decoder", "final_norm", "lm_head",
    "vision_patch_embed", "vision_block", "merger",
]
Shard = Literal["column", "row", "heads", "vocab", "replicated"]
Tower = Literal["text", "vision"]


@dataclass(frozen=True)
class StepShape:
    """The work of one step. ``decode_seqs`` / ``decode_kv`` say how much of ``seqs`` / ``kv`` (and
    of ``tokens`` / ``pairs``: one token and ``kv`` pairs per decode) are single-token decodes, so a
    mixed step (prefill chunks + decodes, as continuous batching makes them) can be costed as its two
    attention regimes instead of one averaged one. ``decode_max_kv``: the longest decoding
    sequence's keys (0: not known; a batch is then priced as if every sequence held the mean), which
    sets the engine's paged decode kernel's longest key range (``costmodels.opcost``)."""

    tokens: float
    pairs: float = 0.0
    kv: float = 0.0
    seqs: float = 1.0
    decode_seqs: float = 0.0
    decode_kv: float = 0.0
    decode_max_kv: float = 0.0

    @staticmethod
    def prefill(lengths: list[int], cached: list[int] | None = None) -> "StepShape":
        """Causal prefill of new tokens ``lengths[i]`` after ``cached[i]`` tokens already in KV."""
        cached = cached or [0] * len(lengths)
        pairs = sum(n * c + n * (n + 1) / 2 for n, c in zip(lengths, cached))
        return StepShape(tokens=sum(lengths), pairs=pairs, kv=sum(n + c for n, c in zip(lengths, cached)), seqs=len(lengths))

    @staticmethod
    def decode(contexts: list[int]) -> "StepShape":
        """One new token for each sequence; ``contexts[i]`` includes the new token."""
        n, c = len(contexts), sum(contexts)
        return StepShape(tokens=n, pairs=c, kv=c, seqs=n, decode_seqs=n, decode_kv=c, decode_max_kv=max(contexts))

    @staticmethod
    def from_sequences(new: list[int], ctx: list[int]) -> tuple["StepShape", "StepShape | None"]:
        """A continuous-batching step from each sequence's new tokens ``new[i]`` and the keys it
        reads ``ctx[i]`` (cached + new): ``(shape, decode part)``, the decode part (sequences adding
        one token) given only when the step also holds prefill chunks, as the simulator's coster
        takes a mixed step; prefill chunks are ``prefill(n_i, cached = ctx_i - n_i)``."""
        pre = [(n, c - n) for n, c in zip(new, ctx) if n > 1]
        dec = [c for n, c in zip(new, ctx) if n == 1]
        p = StepShape.prefill([n for n, _ in pre], [c for _, c in pre]) if pre else None
        d = StepShape.decode(dec) if dec else None
        if p is None or d is None:
            return (p or d), None
        return StepShape(p.tokens + d.tokens, p.pairs + d.pairs, p.kv + d.kv, p.seqs + d.seqs,
                         d.decode_seqs, d.decode_kv, d.decode_max_kv), d

    @staticmethod
    def vision(patches_per_image: list[int]) -> "StepShape":
        """Full (bidirectional) attention within each image."""
        return StepShape(tokens=sum(patches_per_image), pairs=sum(p * p for p in patches_per_image),
                         kv=sum(patches_per_image), seqs=len(patches_per_image))

    def __add__(self, other: "StepShape") -> "StepShape":
        return StepShape(self.tokens + other.tokens, self.pairs + other.pairs, self.kv + other.kv,
                         self.seqs + other.seqs, self.decode_seqs + other.decode_seqs,
                         self.decode_kv + other.decode_kv, max(self.decode_max_kv, other.decode_max_kv))

    @property
    def mixed(self) -> bool:
        """Both prefill chunks and decodes in one step."""
        return 0 < self.decode_seqs < self.seqs

    def split(self) -> tuple["StepShape", "StepShape"]:
        """(prefill part, decode part) of a mixed step."""
        d = StepShape(tokens=self.decode_seqs, pairs=self.decode_kv, kv=self.decode_kv, seqs=self.decode_seqs,
                      decode_seqs=self.decode_seqs, decode_kv=self.decode_kv, decode_max_kv=self.decode_max_kv)
        p = StepShape(tokens=self.tokens - d.tokens, pairs=self.pairs - d.pairs, kv=self.kv - d.kv,
                      seqs=self.seqs - d.seqs)
        return p, d


@dataclass(frozen=True)
class Affine:
    """c + t*T + p*S + k*K + b*B for a StepShape (T, S, K, B)."""

    const: float = 0.0
    tokens: float = 0.0
    pairs: float = 0.0
    kv: float = 0.0
    seqs: float = 0.0

    def __call__(self, s: StepShape) -> float:
        return self.const + self.tokens * s.tokens + self.pairs * s.pairs + self.kv * s.kv + self.seqs * s.seqs

    def __add__(self, o: "Affine") -> "Affine":
        return Affine(self.const + o.const, self.tokens + o.tokens, self.pairs + o.pairs, self.kv + o.kv, self.seqs + o.seqs)

    def scale(self, f: float) -> "Affine":
        return Affine(self.const * f, self.tokens * f, self.pairs * f, self.kv * f, self.seqs * f)


@dataclass
class OpNode:
    """One op of a block. ``shape`` is kind-specific:
    matmul/lm_head/patch_embed: {"k": in_features, "n": out_features}
    attention: {"heads": h, "kv_heads": g, "head_dim": d, "causal": bool}
    norm/activation/rope/elementwise/embedding: {"width": elements per token}
    """

    name: str  # unique within the graph, e.g. "layers.0.self_attn.q_proj"
    kind: OpKind
    module: str  # owning module path in the HF model
    block: str  # owning block name
    params: int = 0
    flops: Affine = field(default_factory=Affine)
    weight_elems: int = 0  # read once per step
    act_read: Affine = field(default_factory=Affine)  # activation elements read
    act_written: Affine = field(default_factory=Affine)  # activation elements written
    kv_read: Affine = field(default_factory=Affine)  # KV-cache elements read
    kv_written: Affine = field(default_factory=Affine)  # KV-cache elements written
    shard: Shard = "replicated"
    shape: dict[str, Any] = field(default_factory=dict)

    def bytes_read(self, s: StepShape, w_bytes: float = 2, a_bytes: float = 2, kv_bytes: float = 2) -> float:
        return self.weight_elems * w_bytes + self.act_read(s) * a_bytes + self.kv_read(s) * kv_bytes


@dataclass
class Block:
    """A unit the planner assigns to stages/GPUs: embedding, one decoder layer, a vision block, ..."""

    name: str  # "embed", "layers.17", "visual.blocks.3", "visual.merger", "norm", "lm_head"
    kind: BlockKind
    tower: Tower
    index: int  # position in execution order within its tower
    params: int
    ops: list[str]  # OpNode names, in execution order


@dataclass
class ModelInfo:
    """Architecture facts the cost model and planner need without re-reading the config."""

    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_context: int
    tie_embeddings: bool = False
    vision: dict[str, Any] | None = None  # depth, hidden, heads, patch_size, spatial_merge_size, ...


@dataclass
class OpGraph:
    """networkx DiGraph of OpNodes (node attribute ``op``) plus the block grouping."""

    info: ModelInfo
    graph: nx.DiGraph
    blocks: list[Block]
    config_sha256: str
    trace_seconds: float = 0.0

    def op(self, name: str) -> OpNode:
        return self.graph.nodes[name]["op"]

    def block_ops(self, block: Block) -> list[OpNode]:
        return [self.op(n) for n in block.ops]

    def blocks_of(self, kind: BlockKind) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]

    @property
    def total_params(self) -> int:
        return sum(b.params for b in self.blocks)

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.info.architecture,
            "total_params": self.total_params,
            "blocks": [{"name": b.name, "kind": b.kind, "tower": b.tower, "params": b.params, "ops": len(b.ops)}
                       for b in self.blocks],
            "trace_seconds": self.trace_seconds,
            "info": asdict(self.info),
        }
