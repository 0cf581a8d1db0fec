"""FP8 weights (and FP8 KV) in the engine on one GPU, against HF and against the engine in bf16.

A Llama-3.1-8B-shaped model with random bf16 weights; its decoder linears are quantized per
output channel to e4m3 (``executors.quant.quantize``) and the HF model is given the dequantized
weights, so HF bf16 is the oracle of the FP8 weights. Three engine runs, side by side:

* ``bf16``: the engine in bf16 on the dequantized weights (the reference error of bf16 itself);
* ``fp8``: FP8 weights (W8A8 ``torch._scaled_mm``, activations quantized per token), bf16 KV;
* ``fp8+kv8``: FP8 weights and an FP8 KV cache.

Reported per run: logits vs HF (``max |engine - hf| / max |hf|``, teacher forced on the engine's
tokens, 16 new tokens of 3 requests), greedy agreement, the bytes of weights the engine holds,
and the wall time of a batch of 32 requests x 128-token prompts x 64 new tokens (best of 3), for
the eager and torch.compile backends (the same engine code: the ratio is the FP8 matmuls' and
activation quantization's effect on whole steps).

    python bench/fp8_gpu_check.py --out DIR            # on a CUDA machine with FP8 (sm_89+)
    python bench/fp8_gpu_check.py --out DIR --tiny     # dry run on CPU with the tiny Llama config
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEW_TOKENS = 16


def quantized_state(hf: Any) -> dict[str, torch.Tensor]:
    """The FP8 checkpoint of ``hf`` (decoder linears e4m3 + ``weight_scale [out, 1]``); ``hf``
    gets the dequantized weights in place."""
    from executors.quant import quantize

    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS:
                q = quantize(p)
                sd[n], sd[n + "_scale"] = q.q, q.scale[:, None]
                p.copy_(q.dequantize(p.dtype))
            else:
                sd[n] = p.detach()
    return sd


def weight_bytes(model: Any) -> int:
    """Bytes of the weights a single-rank engine holds (decoder layouts with their FP8 scales,
    norms, embedding, head): the parameters and ``scale`` buffers of ``model.model``."""
    tree = model.model
    return (sum(p.nbytes for p in tree.parameters())
            + sum(b.nbytes for n, b in tree.named_buffers() if n.endswith(".scale")))


def run(name: str, cfg: dict, hf: Any, sd: dict, weights: str, kv: str, device: str, batch: int,
        new_batch: int, backend: str) -> dict[str, Any]:
    from engine_gpu_check import build_plan, hf_logits, requests_for

    from executors import Request, Sampling
    from executors.config import model_args
    from executors.engine import Engine
    from executors.weights import StateDictSource

    a = model_args(cfg)
    plan = build_plan(name, cfg, "bf16")
    plan.model.weights_dtype, plan.model.kv_dtype = weights, kv
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    eng = Engine(plan, cfg, StateDictSource(sd), device=device, kv_blocks=1024, keep_logits=True, backend=backend)
    held = weight_bytes(eng.local.model) / 1e9
    reqs, _ = requests_for(a, 0)
    res = eng.generate(reqs, max_new_tokens=NEW_TOKENS, sampling=Sampling(stop_on_eos=False))
    rows = []
    for r in res:
        full = list(r.prompt_tokens) + r.tokens
        ref = hf_logits(hf, full[:-1], None, None, device)[len(r.prompt_tokens) - 1:].cpu()
        greedy = ref.argmax(-1).tolist()
        rows.append({"prompt_tokens": len(r.prompt_tokens),
                     "rel_err_max": round(float((r.logits - ref).abs().max() / ref.abs().max()), 5),
                     "rel_err_prefill": round(float((r.logits[0] - ref[0]).abs().max() / ref[0].abs().max()), 5),
                     "greedy_agree": f"{sum(x == y for x, y in zip(greedy, r.tokens))}/{len(r.tokens)}"})
    g = torch.Generator().manual_seed(1)
    load = [Request(tokens=torch.randint(10, min(a.vocab, 100_000), (128,), generator=g).tolist()) for _ in range(batch)]
    eng.keep_logits = False
    times = []
    for _ in range(4):  # the first is a warm-up
        sync()
        t = time.perf_counter()
        eng.generate(load, max_new_tokens=new_batch, sampling=Sampling(stop_on_eos=False))
        sync()
        times.append(time.perf_counter() - t)
    eng.shutdown()
    del eng
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"weights": weights, "kv": kv, "backend": backend, "requests": rows, "weight_gb": round(held, 6),
            "batch": batch, "new_tokens": new_batch, "batch_wall_s": round(min(times[1:]), 3),
            "worst_rel_err": max(x["rel_err_max"] for x in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny Llama config")
    ap.add_argument("--backends", default="eager,compile")
    args = ap.parse_args()
    from engine_gpu_check import hf_random

    from graph.hf_config import load_config

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny.helpers import config as tiny_config

        name, cfg, batch, new = "llama-3.1-8b", tiny_config("llama"), 4, 8
    else:
        name, cfg, batch, new = "llama-3.1-8b", load_config(preset="llama-3.1-8b"), 32, 64
    import transformers

    hf = hf_random(cfg, torch.bfloat16, device, 0)
    sd = quantized_state(hf)
    report: dict[str, Any] = {
        "command": "python bench/fp8_gpu_check.py --out DIR" + (" --tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "model": name, "runs": [],
    }
    bf16_sd = {k: v for k, v in hf.state_dict().items()}
    report["command"] += f" --backends {args.backends}"
    for backend in args.backends.split(","):
        runs = []
        for weights, kv, source in (("bf16", "bf16", bf16_sd), ("fp8", "bf16", sd), ("fp8", "fp8", sd)):
            if backend != "eager" and kv == "fp8":
                continue
            t = time.perf_counter()
            r = run(name, cfg, hf, source, weights, kv, device, batch, new, backend)
            r["wall_s"] = round(time.perf_counter() - t, 1)
            if runs:
                r["batch_speedup_vs_bf16"] = round(runs[0]["batch_wall_s"] / r["batch_wall_s"], 3)
                r["weight_bytes_vs_bf16"] = round(r["weight_gb"] / runs[0]["weight_gb"], 3)
            runs.append(r)
            print(json.dumps(r), flush=True)
            report["runs"].append(r)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "fp8_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
