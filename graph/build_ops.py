"""Turn an exported FX graph (``torch.export``) into logical ops, and fit them over sizes.

An exported block is a list of ATen calls. We keep the ones that cost something and group
them into *logical ops*, the units a cost model prices:

* ``matmul``     one ``aten.linear``/``mm``/``addmm``: FLOPs = 2*M*k*n for an ``(M, k) @ (k, n)``;
* ``attention``  one ``aten.scaled_dot_product_attention`` (its FLOPs depend on the attention
                 pairs, which a shape does not show: the tracer sets them, 4*heads*head_dim*S);
* ``patch_embed`` one convolution: FLOPs = 2 * out.numel() * (C_in * kernel volume);
* ``embedding``  one ``aten.embedding`` (a gather: no FLOPs);
* ``norm`` / ``activation`` / ``rope`` / ``elementwise``: a run of consecutive element-wise or
  reduction calls in the same module (an RMSNorm, an activation module, the rotary code inside an
  attention module, a residual add). A gated MLP's ``act(gate) * up`` product joins the
  activation op, as serving engines run it as one kernel (SiLU-and-mul). FLOPs = one per output element of each arithmetic call
  (input elements for reductions), an estimate: these ops are memory-bound.

Views, reshapes, dtype casts and integer index arithmetic are free and *transparent*: data flows
through them. Memory is counted as if each logical op were one fused kernel: it reads each
distinct tensor it takes from outside the op (activations and its weights) once -- only the
slices it reads when it takes slices of a tensor (q and k out of a fused qkv output) -- and
writes each tensor it produces that something outside the op reads.

``extract`` measures one export (plain numbers at one size N). ``proportional`` turns one
measurement into ``value(N) = per_token * N`` (per_token = value / N): every activation tensor of
a block has the step's tokens as a factor of its size (weights and constant buffers are counted
apart), so one export suffices. ``fit`` takes two exports at sizes N1 < N2 and returns
``value(N) = const + per_token * N``; the tests use it to check that every const is 0, i.e.
that the one-export shortcut is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MATMUL = {"linear", "mm", "addmm", "matmul", "bmm"}
ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math"}
CONV = {"conv3d", "conv2d", "conv1d", "convolution"}
TRANSPARENT = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "slice", "select", "contiguous", "clone", "alias", "detach", "detach_", "t", "unbind", "split",
    "split_with_sizes", "chunk", "getitem", "lift_fresh_copy", "flatten", "unflatten", "to",
    "_to_copy", "type_as", "dropout", "expand_as", "view_as",
}
REDUCTIONS = {"mean", "sum", "amax", "var", "var_mean", "softmax", "_softmax", "log_softmax"}
ACTIVATION_OPS = {"silu", "gelu", "relu", "sigmoid", "tanh", "hardswish", "mish"}


@dataclass
class MeasuredOp:
    """One logical op measured at one export size (plain numbers, in elements)."""

    name: str  # wrapper-relative, e.g. "layer.self_attn.q_proj"
    kind: str
    module: str  # wrapper-relative owning module path
    params: int = 0
    flops: float = 0.0
    act_read: float = 0.0
    act_written: float = 0.0
    shape: dict[str, Any] = field(default_factory=dict)
    preds: list[str] = field(default_factory=list)  # logical ops it reads from, in order


@dataclass
class FittedOp:
    """A logical op as affine functions of the size N: ``(const, per_token)`` pairs."""

    name: str
    kind: str
    module: str
    params: int
    flops: tuple[float, float]
    act_read: tuple[float, float]
    act_written: tuple[float, float]
    shape: dict[str, Any]
    preds: list[str]


def _opname(target: Any) -> str:
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _val(node: Any) -> Any:
    return node.meta.get("val") if hasattr(node, "meta") else None


def _is_float_tensor(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and v.dtype.is_floating_point


def _numel(v: Any) -> int:
    n = 1
    for s in v.shape:
        n *= int(s)
    return n


def _module(node: Any) -> tuple[str, str]:
    """(owning module path, its class name) of an FX node, innermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return str(path), cls_name.rsplit(".", 1)[-1]


def _tensor_args(node: Any) -> list[Any]:
    """FX nodes among a node's positional/keyword args (lists flattened)."""
    out: list[Any] = []
    for a in list(node.args) + list(node.kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if hasattr(x, "op") and hasattr(x, "meta"):
                out.append(x)
    return out


def _classify(node: Any) -> tuple[str, str] | None:
    """(kind, label) of a costed call, or None for a transparent / non-float node."""
    op = _opname(node.target)
    v = _val(node)
    if op == "cat" and len(node.args[0]) == 1:
        return None
    if op in TRANSPARENT or not _is_float_tensor(v):
        return None
    path, cls = _module(node)
    if op in MATMUL:
        return "matmul", ""
    if op in ATTENTION:
        return "attention", "attn"
    if op in CONV:
        return "patch_embed", ""
    if op == "embedding":
        return "embedding", ""
    if "Norm" in cls:
        return "norm", ""
    if op in ACTIVATION_OPS or "Activation" in cls or "GELU" in cls or cls in ("SiLU", "ReLU"):
        return "activation", ""
    if "Attention" in cls:
        return "rope", "rope"
    if op == "add" and ("DecoderLayer" in cls or "Block" in cls):
        return "elementwise", "residual"
    return "elementwise", op


def extract(ep: Any) -> list[MeasuredOp]:
    """Logical ops of one ExportedProgram, in execution order, with their dataflow preds."""
    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters)
    nodes = list(ep.graph.nodes)
    group_of: dict[Any, int] = {}  # costed FX node -> group index
    groups: list[dict[str, Any]] = []
    last_key: tuple[str, str, str] | None = None

    def source(x: Any) -> Any:
        """The producing costed node or placeholder behind a chain of transparent calls."""
        while x.op == "call_function" and x not in group_of:
            args = _tensor_args(x)
            if not args:
                return x
            x = args[0]
        return x

    for n in nodes:
        if n.op != "call_function":
            continue
        c = _classify(n)
        if c is None:
            continue
        kind, label = c
        path, _ = _module(n)
        if kind == "elementwise" and label == "mul":
            # act(gate) * up: serving engines fuse it into the activation kernel (SiLU-and-mul)
            act = [group_of[s] for s in map(source, _tensor_args(n)) if s in group_of
                   and groups[group_of[s]]["kind"] == "activation"
                   and groups[group_of[s]]["path"].rsplit(".", 1)[0] == path]
            if act:
                groups[act[0]]["nodes"].append(n)
                group_of[n] = act[0]
                last_key = None
                continue
        key = (path, kind, label)
        single = kind in ("matmul", "attention", "patch_embed", "embedding")
        if single or key != last_key:
            groups.append({"path": path, "kind": kind, "label": label, "nodes": []})
        groups[-1]["nodes"].append(n)
        group_of[n] = len(groups) - 1
        last_key = None if single else key

    # execution order = where each op finishes (a fused activation finishes at its mul)
    pos = {n: i for i, n in enumerate(nodes)}
    order = sorted(range(len(groups)), key=lambda i: pos[groups[i]["nodes"][-1]])
    remap = {old: new for new, old in enumerate(order)}
    groups = [groups[i] for i in order]
    group_of = {n: remap[gi] for n, gi in group_of.items()}

    def partial_view(a: Any, s: Any) -> Any:
        """The view nearest the producer ``s`` on the chain ``s -> ... -> a`` that holds fewer
        elements than ``s`` (a slice / split piece of it), or None when ``a`` sees all of ``s``."""
        whole = _numel(_val(s))
        chain = []
        x = a
        while x is not s and x.op == "call_function" and x not in group_of:
            chain.append(x)
            args = _tensor_args(x)
            if not args:
                break
            x = args[0]
        for x in reversed(chain):
            v = _val(x)
            if _is_float_tensor(v) and _numel(v) < whole:
                return x
        return None

    def consumers(x: Any) -> list[Any]:
        out: list[Any] = []
        stack = list(x.users)
        while stack:
            u = stack.pop()
            if u.op == "call_function" and u not in group_of:
                stack.extend(u.users)
            else:
                out.append(u)
        return out

    names: dict[str, int] = {}
    ops: list[MeasuredOp] = []
    for gi, g in enumerate(groups):
        base = g["path"] if not g["label"] else (f"{g['path']}.{g['label']}" if g["path"] else g["label"])
        k = names.get(base, 0)
        names[base] = k + 1
        name = f"{base}{k + 1}" if g["label"] == "residual" else (base if k == 0 else f"{base}_{k}")
        op = MeasuredOp(name=name, kind=g["kind"], module=g["path"])
        seen_src: set[Any] = set()
        reads: dict[Any, dict[str, Any]] = {}  # producer -> read whole, or which slices of it
        for n in g["nodes"]:
            v = _val(n)
            opn = _opname(n.target)
            if g["kind"] == "matmul":
                k_dim = int(_val(_tensor_args(n)[0]).shape[-1])
                op.flops += 2 * _numel(v) * k_dim
            elif g["kind"] == "patch_embed":
                w = _val(_tensor_args(n)[1])
                op.flops += 2 * _numel(v) * (_numel(w) // int(w.shape[0]))
            elif g["kind"] not in ("embedding", "attention"):
                ins = [_val(a) for a in _tensor_args(n) if _is_float_tensor(_val(a))]
                op.flops += max([_numel(i) for i in ins] + [0]) if opn in REDUCTIONS else _numel(v)
            for a in _tensor_args(n):
                s = source(a)
                if group_of.get(s) == gi:
                    continue
                sv = _val(s)
                if s.op == "placeholder" and s.name in params:
                    if s in seen_src:
                        continue
                    seen_src.add(s)
                    op.params += _numel(sv)
                    if g["kind"] in ("matmul", "lm_head"):
                        if len(sv.shape) == 2:
                            op.shape = {"k": int(sv.shape[1]), "n": int(sv.shape[0])}
                    elif g["kind"] == "patch_embed" and len(sv.shape) > 1:
                        op.shape = {"k": _numel(sv) // int(sv.shape[0]), "n": int(sv.shape[0])}
                    elif g["kind"] == "embedding":
                        op.shape = {"width": int(sv.shape[1])}
                    continue
                if not _is_float_tensor(sv):
                    continue
                if s in group_of:
                    pred = group_of[s]
                    if pred not in op.preds:
                        op.preds.append(pred)
                elif s.op == "placeholder" and s.name not in sig.user_inputs:
                    continue  # buffers / lifted constants
                r = reads.setdefault(s, {"full": False, "parts": {}})
                part = partial_view(a, s)
                if part is None:
                    r["full"] = True
                else:  # a slice of the producer's output (q out of a fused qkv, say)
                    r["parts"][part] = _numel(_val(part))
            if any(u.op == "output" or group_of.get(u, gi) != gi for u in consumers(n)):
                op.act_written += _numel(v)
            if g["kind"] == "embedding":
                op.act_read += _numel(v)  # the gathered rows
            if g["kind"] in ("norm", "activation", "rope", "elementwise") and "width" not in op.shape:
                op.shape = {"width": int(v.shape[-1]) if len(v.shape) else 1}
            if g["kind"] == "attention":
                q = _val(_tensor_args(n)[0])
                kk = _val(_tensor_args(n)[1])
                op.shape = {"heads": int(q.shape[-3]), "kv_heads": int(kk.shape[-3]), "head_dim": int(q.shape[-1])}
        for src, r in reads.items():
            whole = _numel(_val(src))
            op.act_read += whole if r["full"] else min(whole, sum(r["parts"].values()))
        ops.append(op)
    for op in ops:
        op.preds = [ops[i].name for i in op.preds]  # type: ignore[index]
    return ops


def fit(a: list[MeasuredOp], b: list[MeasuredOp], n1: int, n2: int) -> list[FittedOp]:
    """Per-op ``(const, per_token)`` from measurements at sizes ``n1`` and ``n2``.

    value(N) = const + per_token*N with per_token = (v2 - v1)/(n2 - n1), const = v1 - per_token*n1
    (rounded to 1e-9 relative so exact integer coefficients stay exact).
    """
    if [o.name for o in a] != [o.name for o in b]:
        raise RuntimeError("the two exports differ in structure; cannot fit per-token costs")

    def lin(v1: float, v2: float) -> tuple[float, float]:
        t = (v2 - v1) / (n2 - n1)
        c = v1 - t * n1
        return (_clean(c), _clean(t))

    out: list[FittedOp] = []
    for x, y in zip(a, b):
        out.append(FittedOp(x.name, x.kind, x.module, x.params, lin(x.flops, y.flops),
                            lin(x.act_read, y.act_read), lin(x.act_written, y.act_written), dict(x.shape),
                            list(x.preds)))
    return out


def proportional(a: list[MeasuredOp], n: int) -> list[FittedOp]:
    """Per-op ``(0, value / n)`` from one measurement at size ``n`` (see the module docstring)."""
    return [FittedOp(x.name, x.kind, x.module, x.params, (0.0, _clean(x.flops / n)),
                     (0.0, _clean(x.act_read / n)), (0.0, _clean(x.act_written / n)), dict(x.shape), list(x.preds))
            for x in a]


def _clean(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) <= 1e-9 * max(1.0, abs(v)) else v
