"""Memory per GPU of one pipeline stage and the KV capacity that follows.

For a stage with layers a..b under (tp, sp), P = tp*sp:

* weights: sharded parameters (column/row/heads/vocab ops) / tp + replicated ones (norms);
  vocab-parallel embedding and lm_head (tied weights counted once when both are here). The
  decoder layers' linears take ``weights_dtype`` bytes; embedding, lm_head, norms and the vision
  tower stay in the activation dtype (as the executor holds them under FP8/INT4);
* shift copy (sp > 1): the shifted-TP copy of the sharded parameters, W_sharded / P;
* KV bytes per token = 2 * layers * g_gpu * head_dim * kv_bytes, g_gpu = max(1, g / P)
  (a GQA model with fewer KV heads than P replicates them, one per GPU);
* activations + workspace for a step of ``max_batch_tokens`` tokens (T/sp per GPU):
  T_gpu * a_bytes * (4 h + (heads + 2g) d / tp + 2 I / tp), fp32 logits of up to 256
  sequences on the lm_head stage, vision activations when the encoder is here, plus 0.5 GB
  of library workspace (cuBLAS, NCCL, CUDA graphs);
* KV capacity (tokens per replica) = (0.9 * HBM - weights - shift copy - activations) / KV bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plans.mesh import kv_heads_per_gpu

if TYPE_CHECKING:
    from costmodels.model import CostModel

USABLE_FRACTION = 0.9
WORKSPACE_GB = 0.5
SHARDED = ("column", "row", "heads", "vocab")


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_gb: float
    shift_copy_gb: float
    activations_gb: float
    kv_gb: float  # what is left for the KV cache
    total_gb: float
    capacity_gb: float
    kv_bytes_per_token: float  # per GPU
    kv_tokens: int  # capacity in tokens, per replica

    @property
    def fits(self) -> bool:
        return self.kv_tokens > 0


def _param_split(cm: "CostModel", blocks: list) -> tuple[float, float]:
    """(sharded, replicated) parameter elements of the blocks, from their ops."""
    sharded = replicated = 0.0
    for b in blocks:
        ops = cm.graph.block_ops(b)
        op_params = sum(max(op.params, op.weight_elems) for op in ops)
        for op in ops:
            w = max(op.params, op.weight_elems)
            if op.shard in SHARDED:
                sharded += w
            else:
                replicated += w
        replicated += max(b.params - op_params, 0)  # parameters no op claims (e.g. biases folded elsewhere)
    return sharded, replicated


def memory_per_gpu(cm: "CostModel", *, layers: tuple[int, int], tp: int, sp: int, embedding: bool, lm_head: bool,
                   vision: bool, max_batch_tokens: int) -> MemoryBreakdown:
    info = cm.info
    a, b = layers
    blocks = list(cm.decoders[a:b + 1])
    text = [x for x in cm.graph.blocks if x.tower == "text"]
    if embedding:
        blocks += [x for x in text if x.kind == "embedding"]
    if lm_head:
        heads = [x for x in text if x.kind in ("final_norm", "lm_head")]
        if info.tie_embeddings and embedding:
            heads = [x for x in heads if x.kind != "lm_head"]
        blocks += heads
    if vision:
        blocks += [x for x in cm.graph.blocks if x.tower == "vision"]
    n_dec = b - a + 1
    sharded, replicated = _param_split(cm, blocks[:n_dec])  # decoder layers: weights_dtype
    other, other_rep = _param_split(cm, blocks[n_dec:])  # embedding, head, vision: activation dtype
    wb, ab, kvb = cm.rates.w_bytes, cm.rates.a_bytes, cm.rates.kv_bytes
    p = tp * sp
    weights = (sharded / tp * wb + other / tp * ab + (replicated + other_rep) * ab) / 1e9
    shift = (sharded * wb + other * ab) / p / 1e9 if sp > 1 else 0.0
    n_layers = b - a + 1
    g_gpu = kv_heads_per_gpu(info.kv_heads, p)
    kv_per_token = 2 * n_layers * g_gpu * info.head_dim * kvb
    t_gpu = max_batch_tokens / sp
    act = t_gpu * ab * (4 * info.hidden + (info.heads + 2 * info.kv_heads) * info.head_dim / tp
                        + 2 * info.intermediate / tp)
    if lm_head:
        act += min(max_batch_tokens, 256) * info.vocab / tp * 4
    if vision and info.vision:
        vh = float(info.vision.get("hidden", info.vision.get("embed_dim", 1280)))
        patches = min(4 * max_batch_tokens, 65536)
        act += patches * ab * 10 * vh / tp
    act_gb = act / 1e9 + WORKSPACE_GB
    cap = cm.gpu.hbm_gb
    free = cap * USABLE_FRACTION - weights - shift - act_gb
    kv_tokens = int(max(free, 0.0) * 1e9 // kv_per_token) if kv_per_token > 0 else 0
    kv_gb = kv_tokens * kv_per_token / 1e9
    return MemoryBreakdown(weights_gb=weights, shift_copy_gb=shift, activations_gb=act_gb, kv_gb=kv_gb,
                           total_gb=weights + shift + act_gb + kv_gb, capacity_gb=cap,
                           kv_bytes_per_token=kv_per_token, kv_tokens=kv_tokens)
