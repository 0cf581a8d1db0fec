"""Measured accuracy of the cost model: time real forward steps on the GPU, compare with
the CostModel's predictions.

What is timed (bf16, random weights, CUDA-graph replays; per-layer time = chain of K
distinct layers / K so weights come from HBM as in a real step):

* whole HF decoder layers (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``) of Llama-3.1-8B and
  Qwen2.5-7B built from graph/presets, attention through a registered attention function:
  packed variable-length prefill (torch varlen flash kernel, or SDPA per sequence), decode
  against a dense KV cache (SDPA, the new token's K/V written into the cache);
* Qwen2-VL-7B vision blocks (HF ``Qwen2VLVisionBlock`` submodules: LayerNorms, qkv, vision
  RoPE, full attention per image, proj, MLP) over single and packed images.

Shapes: prefill 128..16384 tokens (single sequences and packed mixes), decode batch 1..256
at contexts 256..8192, images of 256..16384 patches. None of these is a calibration shape
(calibration times single GEMMs / attention kernels on other sizes, costmodels.calibrate).

Usage:
    python bench/cost_accuracy.py device --out DIR [--quick] [--cpu-dry-run] [--budget-s S]
        calibrate (DIR/<gpu>.json) and time the validation steps (DIR/accuracy_raw.json)
    python bench/cost_accuracy.py report --raw accuracy_raw.json --profile costmodels/profiles/h100.json
        [--out-dir bench/results]   predictions, errors -> cost_accuracy.json / cost_accuracy.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT_MODELS = ["llama-3.1-8b", "qwen2.5-7b"]
VISION_MODEL = "qwen2-vl-7b"

PREFILL = [[128], [384], [1000], [2048], [3000], [4096], [6000], [8192], [12000], [16384],
           [100, 300, 700, 1500], [512] * 8, [2000, 1000, 500, 250, 125], [4096, 4096, 2048], [64] * 32,
           [3000] * 5, [200] * 10, [7000, 900]]
DECODE_B = [1, 4, 16, 64, 128, 256]
DECODE_C = [256, 1024, 4096, 8192]
VISION = [[256], [1024], [3600], [8192], [16384], [1024] * 4, [3600, 1024, 576], [256] * 16, [4096, 4096]]

QUICK_PREFILL = [[128], [2048], [16384], [100, 300, 700, 1500], [3000] * 5]
QUICK_DECODE_B, QUICK_DECODE_C = [1, 64, 256], [256, 8192]
QUICK_VISION = [[1024], [8192], [1024] * 4]


# ----------------------------------------------------------------------------- device side

def _preset(name: str) -> dict[str, Any]:
    from graph.hf_config import load_config

    return load_config(name)


def _shrink_text(cfg: dict[str, Any]) -> dict[str, Any]:
    c = dict(cfg)
    c.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return c


def _build_text(cfg: dict[str, Any], n: int, dev, dt):
    import torch
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    qwen = cfg.get("model_type", "").startswith("qwen2")
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    conf = (Qwen2Config if qwen else LlamaConfig)(**keep)
    conf._attn_implementation = "shiftplan_packed"
    layer_cls, rot_cls = (Qwen2DecoderLayer, Qwen2RotaryEmbedding) if qwen else (LlamaDecoderLayer, LlamaRotaryEmbedding)
    with torch.device(dev):
        layers = [layer_cls(conf, i).to(dt).eval() for i in range(n)]
        rot = rot_cls(conf)
    return conf, layers, rot


def _register_attention(attn) -> None:
    from transformers import AttentionInterface

    from costmodels.gpu_bench import decode_attention

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        ctx = kw["shiftplan_ctx"]
        if ctx["mode"] == "decode":
            kc, vc = ctx["caches"][module.layer_idx]
            c = kc.shape[2]
            kc[:, :, c - 1:c].copy_(key)
            vc[:, :, c - 1:c].copy_(value)
            return decode_attention(query, kc, vc).transpose(1, 2), None
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return attn(q, k, v, ctx["lengths"], True, ctx["cu"]).unsqueeze(0), None

    AttentionInterface.register("shiftplan_packed", fn)


def _first(out):
    """A decoder layer's hidden states (older transformers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def time_text(model: str, timer, attn, dev, dt, prefill, dec_b, dec_c, dry: bool, log, deadline: float) -> list[dict]:
    import torch

    from costmodels.gpu_bench import cu_seqlens

    cfg = _preset(model)
    if dry:
        cfg = _shrink_text(cfg)
    conf, layers, rot = _build_text(cfg, 1 if dry else 2, dev, dt)
    h = conf.hidden_size
    g = torch.Generator(device=dev).manual_seed(1)
    pts = []
    with torch.inference_mode():
        for lens in prefill:
            if time.time() > deadline:
                break
            lens = [max(1, n // 16) for n in lens] if dry else lens
            T = sum(lens)
            x = torch.randn(1, T, h, device=dev, dtype=dt, generator=g)
            pos = torch.cat([torch.arange(n, device=dev) for n in lens]).unsqueeze(0)
            pe = rot(x, pos)
            ctx = {"mode": "prefill", "lengths": lens, "cu": cu_seqlens(lens, dev)}

            def run(x=x, pe=pe, ctx=ctx):
                y = x
                for layer in layers:
                    y = _first(layer(y, position_embeddings=pe, shiftplan_ctx=ctx))
                return y
            ms = timer(run) / len(layers)
            pts.append({"model": model, "kind": "prefill", "lengths": lens, "measured_ms": ms})
            log(f"{model} prefill {lens if len(lens) < 6 else f'{len(lens)} seqs, {T} tok'}: {ms:.3f} ms")
        d = conf.head_dim if getattr(conf, "head_dim", None) else h // conf.num_attention_heads
        G = conf.num_key_value_heads
        for B in dec_b:
            for C in dec_c:
                if time.time() > deadline:
                    break
                C = max(8, C // 64) if dry else C
                caches = {layer.self_attn.layer_idx: (torch.randn(B, G, C, d, device=dev, dtype=dt, generator=g),
                                                      torch.randn(B, G, C, d, device=dev, dtype=dt, generator=g))
                          for layer in layers}
                x = torch.randn(B, 1, h, device=dev, dtype=dt, generator=g)
                pe = rot(x, torch.full((B, 1), C - 1, device=dev))
                ctx = {"mode": "decode", "caches": caches}

                def run(x=x, pe=pe, ctx=ctx):
                    y = x
                    for layer in layers:
                        y = _first(layer(y, position_embeddings=pe, shiftplan_ctx=ctx))
                    return y
                ms = timer(run) / len(layers)
                pts.append({"model": model, "kind": "decode", "batch": B, "context": C, "measured_ms": ms})
                log(f"{model} decode B={B} C={C}: {ms:.3f} ms")
                del caches
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    del layers
    return pts


def time_vision(timer, attn, dev, dt, images, dry: bool, log, deadline: float) -> list[dict]:
    import torch
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionBlock, apply_rotary_pos_emb_vision

    from costmodels.gpu_bench import cu_seqlens

    vc = dict(_preset(VISION_MODEL)["vision_config"])
    if dry:
        vc.update(embed_dim=64, num_heads=4)
    conf = Qwen2VLVisionConfig(**vc)
    n = 1 if dry else 4
    with torch.device(dev):
        blocks = [Qwen2VLVisionBlock(conf).to(dt).eval() for _ in range(n)]
    D, H = conf.embed_dim, conf.num_heads
    d = D // H
    g = torch.Generator(device=dev).manual_seed(2)

    def block_fwd(b, x, cos, sin, lens, cu):
        T = x.shape[0]
        qkv = b.attn.qkv(b.norm1(x)).reshape(T, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        o = attn(q, k, qkv[2], lens, False, cu)
        x = x + b.attn.proj(o.reshape(T, -1))
        return x + b.mlp(b.norm2(x))

    pts = []
    with torch.inference_mode():
        for lens in images:
            if time.time() > deadline:
                break
            lens = [max(4, p // 16) for p in lens] if dry else lens
            T = sum(lens)
            x = torch.randn(T, D, device=dev, dtype=dt, generator=g)
            ang = torch.rand(T, d // 2, device=dev) * 6.28
            emb = torch.cat([ang, ang], -1)
            cos, sin = emb.cos(), emb.sin()
            cu = cu_seqlens(lens, dev)

            def run(x=x, cos=cos, sin=sin, lens=lens, cu=cu):
                y = x
                for b in blocks:
                    y = block_fwd(b, y, cos, sin, lens, cu)
                return y
            ms = timer(run) / len(blocks)
            pts.append({"model": VISION_MODEL, "kind": "vision", "patches": lens, "measured_ms": ms})
            log(f"vision {lens if len(lens) < 6 else f'{len(lens)} images, {T} patches'}: {ms:.3f} ms")
    return pts


def device_run(out: Path, quick: bool, dry: bool, budget_s: float, skip_calibration: bool) -> None:
    import torch

    from costmodels.calibrate import calibrate, device_meta, find_gpu_name
    from costmodels.gpu_bench import Timer, make_packed_attention

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    logf = (out / "device_log.txt").open("a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    meta = device_meta()
    gpu = find_gpu_name(meta["device_name"]) or ("cpu" if dry else "unknown")
    log(f"device {meta}")
    if not skip_calibration:
        calibrate(out / f"{gpu}.json", quick=quick, gpu=gpu, cpu_dry_run=dry, budget_s=budget_s * 0.55, log=log)
        log(f"calibration written to {gpu}.json")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dt = torch.bfloat16
    attn = make_packed_attention(dev)
    _register_attention(attn)
    timer = Timer(dev)
    deadline = t0 + budget_s
    prefill = QUICK_PREFILL if quick else PREFILL
    dec_b, dec_c = (QUICK_DECODE_B, QUICK_DECODE_C) if quick else (DECODE_B, DECODE_C)
    raw = {"meta": meta, "gpu": gpu, "attention_kernel": attn.kernel, "dry_run": dry, "points": [],
           "attention_fallback": attn.fallback_reason}

    def save() -> None:
        (out / "accuracy_raw.json").write_text(json.dumps(raw, indent=0))

    for model in TEXT_MODELS:
        try:
            raw["points"] += time_text(model, timer, attn, dev, dt, prefill, dec_b, dec_c, dry, log, deadline)
        except Exception as e:  # noqa: BLE001 -- keep what was measured
            log(f"{model} failed: {type(e).__name__}: {e}")
            raw.setdefault("errors", []).append(f"{model}: {type(e).__name__}: {e}")
        save()
    try:
        raw["points"] += time_vision(timer, attn, dev, dt, QUICK_VISION if quick else VISION, dry, log, deadline)
    except Exception as e:  # noqa: BLE001
        log(f"vision failed: {type(e).__name__}: {e}")
        raw.setdefault("errors", []).append(f"vision: {type(e).__name__}: {e}")
    raw["graph_capture_failures"] = timer.graph_failures
    raw["attention_kernel_end"], raw["attention_fallback"] = attn.kernel, attn.fallback_reason
    raw["seconds"] = time.time() - t0
    save()
    log(f"validation: {len(raw['points'])} points; total {time.time() - t0:.0f} s")
    prof_path = out / f"{gpu}.json"
    if prof_path.exists():
        try:
            res = report(out / "accuracy_raw.json", prof_path, out, command="(device run)")
            for k in ("prefill", "decode", "vision"):
                log(f"{k}: median {res[k]['median_abs_pct']:.1f}%  p90 {res[k]['p90_abs_pct']:.1f}%  n={len(res[k]['points'])}")
        except Exception as e:  # noqa: BLE001
            log(f"report failed: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- report side

def _pct(xs: list[float], q: float) -> float:
    """q-quantile with linear interpolation between order statistics."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def predict(points: list[dict], profile_path: Path | None, *, dry: bool = False) -> tuple[list[dict], str, str]:
    """Predicted ms for each raw point with the CostModel (graph as the planner gets it)."""
    from costmodels.build import graph_for_config
    from costmodels.model import CostModel
    from costmodels.profile import read_profile
    from graph.opgraph import StepShape

    prof = read_profile(profile_path) if profile_path else None
    models: dict[str, CostModel] = {}
    source = "synthetic"
    for name in {p["model"] for p in points}:
        cfg = _preset(name)
        if dry and name != VISION_MODEL:
            cfg = _shrink_text(cfg)
        if dry and name == VISION_MODEL:
            cfg = dict(cfg, vision_config=dict(cfg["vision_config"], embed_dim=64, num_heads=4))
        g = graph_for_config(cfg)
        source = "traced" if g.trace_seconds > 0 else source
        gpu = prof.gpu if prof else "h100"
        models[name] = CostModel(g, gpu, profile=prof)
    out = []
    for p in points:
        cm = models[p["model"]]
        if p["kind"] == "vision":
            block = cm.graph.blocks_of("vision_block")[0]
            pred = cm.block_time(block, StepShape.vision(p["patches"])).total_ms
        else:
            shape = (StepShape.prefill(p["lengths"]) if p["kind"] == "prefill"
                     else StepShape.decode([p["context"]] * p["batch"]))
            pred = cm.block_time(cm.decoders[0], shape).total_ms
        err = (pred - p["measured_ms"]) / p["measured_ms"] * 100
        out.append({**p, "predicted_ms": round(pred, 5), "measured_ms": round(p["measured_ms"], 5),
                    "err_pct": round(err, 2)})
    pid = prof.id if prof else "roofline"
    return out, pid, source


def _describe(p: dict) -> str:
    if p["kind"] == "prefill":
        L = p["lengths"]
        return f"{L[0]}" if len(L) == 1 else (f"{len(L)}x{L[0]}" if len(set(L)) == 1 else "+".join(map(str, L)))
    if p["kind"] == "decode":
        return f"B={p['batch']} C={p['context']}"
    P = p["patches"]
    return f"{P[0]}" if len(P) == 1 else (f"{len(P)}x{P[0]}" if len(set(P)) == 1 else "+".join(map(str, P)))


def report(raw_path: Path, profile_path: Path | None, out_dir: Path, command: str, name: str = "cost_accuracy",
           extra: dict | None = None) -> dict:
    raw = json.loads(Path(raw_path).read_text())
    pts, pid, source = predict(raw["points"], profile_path, dry=raw.get("dry_run", False))
    res: dict[str, Any] = {}
    for kind in ("prefill", "decode", "vision"):
        ps = [p for p in pts if p["kind"] == kind]
        errs = [abs(p["err_pct"]) for p in ps]
        res[kind] = {"median_abs_pct": round(_pct(errs, 0.5), 2), "p90_abs_pct": round(_pct(errs, 0.9), 2),
                     "points": ps}
    meta = raw.get("meta", {})
    calib_heads = ""
    if profile_path:
        praw = json.loads(Path(profile_path).read_text()).get("raw", {})
        causal = sorted({f"{p['heads']}/{p['kv_heads']}" for p in praw.get("attn_causal", [])})
        full = sorted({int(p["heads"]) for p in praw.get("attn_full", [])})
        calib_heads = f"causal {', '.join(causal)} heads; full {', '.join(map(str, full))} heads"
    res["meta"] = {"profile": pid, "graph": source, "device": meta.get("device_name"), "driver": meta.get("driver"),
                   "torch": meta.get("torch"), "transformers": meta.get("transformers"), "date": meta.get("date"),
                   "attention_kernel": raw.get("attention_kernel"), "command": command,
                   "calibration_attention_heads": calib_heads,
                   "timing": "CUDA-graph replays, median of 5; per layer = chain of distinct layers / count"}
    out_dir.mkdir(parents=True, exist_ok=True)
    if extra:
        res["meta"].update(extra)
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(_markdown(res))
    return res


def _markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# Cost-model accuracy", "",
             f"Device: {m['device']} (driver {m['driver']}), torch {m['torch']}, transformers {m['transformers']}, "
             f"{m['date']}. Profile `{m['profile']}`, op graph: {m['graph']}, attention kernel: {m['attention_kernel']}.",
             f"Timing: {m['timing']}.", "", f"Command: `{m['command']}`", "",
             *([f"Raw timings made on the GPU machine by `{m['device_command']}` "
                "(calibration first, then the validation steps, in one call).", ""] if m.get("device_command") else []),
             *([m["note"], ""] if m.get("note") else []),
             "Calibration shapes (single GEMMs on an (M, N, K) grid of N, K in 768..24576 off these models' sizes; "
             f"attention kernels ({m.get('calibration_attention_heads') or 'causal 40/8, full 20 heads'}); "
             "memory ops at other widths) are not the validated steps (whole decoder layers and vision blocks).", "",
             "| set | points | median abs error | p90 abs error | goal |", "| --- | --- | --- | --- | --- |"]
    for k in ("prefill", "decode", "vision"):
        r = res[k]
        lines.append(f"| {k} | {len(r['points'])} | {r['median_abs_pct']:.1f}% | {r['p90_abs_pct']:.1f}% | <= 5% / <= 10% |")
    lines += ["", "## Points", "", "| model | kind | shape | measured ms | predicted ms | error |",
              "| --- | --- | --- | --- | --- | --- |"]
    for k in ("prefill", "decode", "vision"):
        for p in res[k]["points"]:
            lines.append(f"| {p['model']} | {k} | {_describe(p)} | {p['measured_ms']:.4f} | {p['predicted_ms']:.4f} "
                         f"| {p['err_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("device", help="calibrate and time validation steps on this machine's GPU")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--quick", action="store_true")
    d.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU, to test the script")
    d.add_argument("--budget-s", type=float, default=400.0)
    d.add_argument("--skip-calibration", action="store_true")
    r = sub.add_parser("report", help="predictions and errors from saved raw timings")
    r.add_argument("--raw", type=Path, required=True)
    r.add_argument("--profile", type=Path, default=None)
    r.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    r.add_argument("--name", default="cost_accuracy", help="output file stem (cost_accuracy -> .json/.md)")
    r.add_argument("--device-command", default="python3 bench/cost_accuracy.py device --out OUT --budget-s 380",
                   help="the command that made the raw timings (recorded in the report)")
    r.add_argument("--note", default="", help="a paragraph for the report (e.g. which calibration call the profile is from)")
    a = ap.parse_args(argv)
    if a.cmd == "device":
        device_run(a.out, a.quick, a.cpu_dry_run, a.budget_s, a.skip_calibration)
        return 0
    cmd = "python bench/cost_accuracy.py report --raw " + str(a.raw.name if a.raw.is_absolute() else a.raw)
    cmd += f" --profile {a.profile if a.profile and not a.profile.is_absolute() else (a.profile.name if a.profile else '')}"
    cmd += f" --name {a.name}" if a.name != "cost_accuracy" else ""
    extra = {"device_command": a.device_command, **({"note": a.note} if a.note else {})}
    res = report(a.raw, a.profile, a.out_dir, command=cmd, name=a.name, extra=extra)
    for k in ("prefill", "decode", "vision"):
        print(f"{k:8s} median {res[k]['median_abs_pct']:6.2f}%  p90 {res[k]['p90_abs_pct']:6.2f}%  n={len(res[k]['points'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
