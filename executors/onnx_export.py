"""Export one pipeline stage as ONNX: its layers at TP degree 1 running one prefill.

The exported graph is ``forward(x, pos) -> y`` for one sequence of ``T`` tokens (``T`` dynamic):
``x`` is ``tokens [T]`` int64 on the embedding stage, else ``hidden [T, H]``; ``pos`` is ``[T]``
(``[3, T]`` for M-RoPE models); ``y`` is ``logits [T, V]`` on the lm_head stage, else
``hidden [T, H]``. Attention is causal over the given tokens (the KV cache starts empty).
Image inputs are not part of the exported graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from executors.attention import LayerCache
from executors.config import DTYPES, model_args, plan_config
from executors.model import AttnMeta, checkpoint_shapes
from executors.parallel import Par
from executors.stage import StageModel
from executors.weights import RandomSource, open_weights
from plans.errors import UserError
from plans.schema import Plan, load_plan


class StageGraph(torch.nn.Module):
    """A cache-free, single-sequence view of a ``StageModel`` (what ONNX export traces)."""

    def __init__(self, sm: StageModel):
        super().__init__()
        self.sm = sm

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        sm, a = self.sm, self.sm.a
        T = pos.shape[-1]
        ar = torch.arange(T, device=x.device)
        meta = AttnMeta(ar, ar, ar[None, :] <= ar[:, None])
        caches = []
        for layer in sm.layers:
            nkv = layer.layouts["tp"].attn.nkv
            cache = LayerCache(0, nkv, a.head_dim, sm.dtype, x.device)
            cache.k = torch.zeros(T + 1, nkv, a.head_dim, dtype=sm.dtype)
            cache.v = torch.zeros_like(cache.k)
            caches.append(cache)
        return sm.model(x, pos, caches, meta)


def stage_graph(plan: Plan, stage: int, weights: Any = None, config: dict | None = None, seed: int = 0) -> StageGraph:
    if not 0 <= stage < len(plan.stages):
        raise UserError(f"--stage {stage}: plan {plan.name} has stages 0..{len(plan.stages) - 1}")
    args = model_args(config if config is not None else plan_config(plan))
    src = open_weights(weights) if weights else RandomSource(checkpoint_shapes(args), seed)
    dtype = DTYPES.get(plan.model.weights_dtype, torch.float32)
    one = plan.model_copy(deep=True)
    one.shift.enabled = False
    sm = StageModel(one, plan.stages[stage], args, Par(), src, dtype, dtype, 1)
    return StageGraph(sm).eval()


def example_inputs(g: StageGraph, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = g.sm.a
    if g.sm.model.embed is not None:
        x = torch.arange(tokens) % a.vocab
    else:
        x = torch.randn(tokens, a.hidden, generator=torch.Generator().manual_seed(0)).to(g.sm.dtype)
    pos = torch.arange(tokens)
    return x, (pos[None].repeat(3, 1) if a.mrope_section else pos)


def export_stage(plan: Plan | str | Path, stage: int, out: str | Path, weights: Any = None, tokens: int = 8,
                 config: dict | None = None) -> Path:
    """Write stage ``stage`` of ``plan`` to ``out`` as ONNX (needs the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'shiftplan[onnx]'") from None
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    g = stage_graph(plan, stage, weights, config)
    x, pos = example_inputs(g, tokens)
    T = torch.export.Dim("T", min=2, max=g.sm.a.max_positions)
    dyn = {"x": {0: T}, "pos": {pos.dim() - 1: T}}
    out = Path(out)
    with torch.no_grad():
        prog = torch.onnx.export(g, (x, pos), dynamo=True, dynamic_shapes=dyn, input_names=["x", "pos"],
                                 output_names=["y"], optimize=True)
    prog.save(str(out))
    return out
