"""Multimodal speed on two GPUs: Qwen2-VL-7B with images, each mesh and encoder placement vs one GPU.

Qwen2-VL-7B shapes (the preset's config), bf16, seeded random weights written once as a
safetensors checkpoint that every rank reads its slices of. Plans are pinned by hand
(``planner.pinned.pinned_plan``: even stages, the cost model's memory and, for shift, its threshold).
Measured in one run:

(a) The vision tower alone on one GPU (``executors.vision.VisionTower``), one image at each of
    ``--resolutions`` (448x448, 896x896): time per image (median of CUDA-event timings) beside its
    FLOPs at the matmul rate measured in the same run (an 8192^3 bf16 product). An image of
    ``H x W`` px has ``N = (H/14)(W/14)`` patches (one frame); with embed width ``E``, MLP width
    ``F``, ``B`` blocks, patch size ``p``, ``C`` channels, temporal patch ``t``, merge ``m`` and LLM
    width ``O`` (``M = E m^2``)::

        patch embed   2 N (C t p^2) E
        per block     2 N (3E^2 + E^2) + 4 N^2 E + 2 N (2 E F)   qkv, proj; QK^T and AV over the
                                                                 frame; fc1, fc2 (SwiGLU: 3 E F)
        merger        2 (N / m^2) (M^2 + M O)
        total         patch embed + B x per block + merger

    (Qwen2.5-VL blocks outside ``fullatt_block_indexes`` attend within windows: ``4 E sum w_i^2``
    over the windows' patch counts ``w_i``.) Floor = FLOPs / matmul rate.

(b)+(c) For each case (a mesh and an encoder placement on two GPUs; ``single`` is one GPU):

* TTFT of one request with one 448x448 image (256 image tokens) and ``--text`` text tokens (median
  of ``--ttft-reps``), and of a text-only request of the same length: their difference is the
  image's cost in the engine (the pixels reaching the encoding ranks, encoding, the embeddings
  reaching stage 0), reported against the tower's
  floor under the placement (FLOPs / (rate x the tower's TP degree));
* 32 concurrent requests (``--batch``), one 448x448 image each, 64 new tokens (``--new``): TTFT p50,
  TPOT p50, output tokens/s, requests/s; each as a ratio to ``single``;
* (e) the two-GPU targets with images: decode TPOT at batch 1 (one image request, ``--new`` tokens)
  and the TTFT of one long prompt of ``--long-images`` images of ``--long-px`` px (7 x 896 px: 7,168
  image tokens), each as a ratio to ``single``, beside the batch's throughput.

Cases: ``single``; ``tp2/stage0_tp`` (tower TP-sharded over both GPUs); ``tp2/stage0_dp`` (tower
whole on each, images dealt by patch count); ``sp2/stage0_dp``; ``shift-sp2/stage0_dp``;
``pp2/stage0_tp`` (tower on stage 0 only); ``pp2/all_dp`` (tower on both stages); ``dp2``;
``dedicated`` (the LLM on one GPU, the tower on the other). A failing case records its error and
the run goes on. Decode steps replay CUDA graphs where they run; layers are compiled on GPUs
(``--backend``; eager with ``--tiny``).

    python bench/vl_speed.py --out DIR                 # on a machine with 2 GPUs (~4 min)
    python bench/vl_speed.py --out DIR --tiny          # CPU dry run (gloo ranks, tiny config; the shift
                                                       # threshold pinned at TINY_THRESHOLD tokens so that
                                                       # both modes run: the H200 cost model's crossover
                                                       # says nothing about a tiny config on CPU ranks)

Writes DIR/vl_speed.json and DIR/vl_speed.md (rewritten after each case).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_THRESHOLD = 8  # --tiny: steps of at most 8 tokens run TP, larger ones SP x TP
CASES: dict[str, dict[str, Any]] = {
    "single": {},
    "tp2/stage0_tp": {"tp": 2, "placement": "stage0_tp"},
    "tp2/stage0_dp": {"tp": 2, "placement": "stage0_dp"},
    "sp2/stage0_dp": {"sp": 2, "placement": "stage0_dp"},
    "shift-sp2/stage0_dp": {"sp": 2, "shift": True, "placement": "stage0_dp"},
    "pp2/stage0_tp": {"pp": 2, "placement": "stage0_tp"},
    "pp2/all_dp": {"pp": 2, "placement": "all_dp"},
    "dp2": {"dp": 2},
    "dedicated": {"placement": "dedicated", "dedicated_gpus": 1},
}


def tower_flops(v: Any, grid: tuple[int, int, int], out_dim: int | None = None) -> dict[str, float]:
    """FLOPs of the vision tower on one image of patch grid ``(t, h, w)`` (the module doc's formula)."""
    t, h, w = grid
    N = t * h * w
    E, F, m = v.embed_dim, v.mlp_dim, v.merge
    O = out_dim or v.out_dim
    M = E * m * m
    patch = 2 * N * v.patch_dim * E
    mlp_mats = 3 if v.qwen25 else 2
    linear = 2 * N * (4 * E * E + mlp_mats * E * F)
    full_pairs = t * (h * w) ** 2  # attention within each frame
    if v.qwen25:
        from executors.vision import window_order

        _order, lens = window_order([grid], m, v.window_size // m // v.patch_size)
        win_pairs = sum(x * x for x in lens)
        pairs = sum(full_pairs if i in v.fullatt_blocks else win_pairs for i in range(v.depth))
    else:
        pairs = v.depth * full_pairs
    attention = 4 * E * pairs
    merger = 2 * (N // (m * m)) * (M * M + M * O)
    total = patch + v.depth * linear + attention + merger
    return {"patches": N, "tokens": N // (m * m), "patch_embed": patch, "blocks_linear": v.depth * linear,
            "attention": attention, "merger": merger, "total": total}


def image_grid(px: int, v: Any) -> tuple[int, int, int]:
    """Patch grid of a ``px x px`` image (a multiple of ``patch * merge``)."""
    f = v.patch_size * v.merge
    side = max(f, round(px / f) * f) // v.patch_size
    return (1, side, side)


def image_tokens(px: int, v: Any) -> int:
    """LLM tokens of one ``px x px`` image: its patches over ``merge^2``."""
    t, h, w = image_grid(px, v)
    return t * h * w // v.merge**2


TOWER_IMAGES = (1, 8)  # images per tower call in (a)


def tower_alone(cfg: dict, device: str, dtype: torch.dtype, resolutions: list[int], rate: float,
                reps: int, warmup: int, backend: str = "eager") -> dict[str, Any]:
    """(a): the tower on one GPU as the engine runs it (blocks compiled for ``backend``), called on
    ``k`` equal images (``TOWER_IMAGES``): launched from Python, and replayed as CUDA graphs
    (``executors.tower_graphs``, GPUs only); time per image against the FLOPs floor."""
    from bench.common import DeviceRandomSource, median, timed_ms
    from executors.backends import compile_tower
    from executors.config import model_args
    from executors.encoders import load_tower
    from executors.tower_graphs import TowerGraphs
    from executors.vision import vision_shapes

    a = model_args(cfg)
    v = a.vision
    dev = torch.device(device)
    tower = load_tower(v, DeviceRandomSource(vision_shapes(v), dev, dtype), dtype, dev)
    compile_tower(tower, backend)  # as the engine runs it (executors.backends)
    runs = {"launched": tower} | ({"graphs": TowerGraphs(tower)} if device == "cuda" else {})
    out: dict[str, Any] = {}
    for px in resolutions:
        for k in TOWER_IMAGES:
            key = f"{px}x{px} x{k}"
            try:
                grid = image_grid(px, v)
                fl = tower_flops(v, grid, a.hidden)
                pixels = torch.randn(k * fl["patches"], v.patch_dim, device=dev, dtype=dtype)
                floor = 1e3 * fl["total"] / (rate * 1e12)
                row: dict[str, Any] = {"grid": list(grid), "images": k, "patches": fl["patches"],
                                       "llm_tokens": fl["tokens"], "gflop": round(fl["total"] / 1e9, 3),
                                       "gflop_parts": {n: round(fl[n] / 1e9, 3) for n in ("patch_embed", "blocks_linear", "attention", "merger")},
                                       "floor_ms": round(floor, 6)}
                for name, run in runs.items():
                    with torch.inference_mode():
                        ms = median(timed_ms(lambda: run(pixels, [grid] * k), dev, reps, warmup)) / k
                    row[name] = {"ms_per_image": round(ms, 4), "x_floor": sig(ms / floor),
                                 "tflops_achieved": round(fl["total"] / (ms / 1e3) / 1e12, 4)}
                out[key] = row
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print("tower", key, json.dumps(out[key]), flush=True)
    del tower, runs
    return out


def requests(a: Any, n: int, px: int, text: int, seed: int, image: bool = True, images: int = 1) -> list[Any]:
    """``n`` requests of ``text`` random text tokens, ``images`` images (if ``image``) in the middle:
    one image-pad token each, which the engine expands to the image's tokens. Text-only requests
    have the same total length as one-image requests."""
    from executors import Request
    from executors.images import ImageInput

    g = torch.Generator().manual_seed(seed)
    hi = min(a.vocab, 100_000)
    grid = image_grid(px, a.vision)
    rows = grid[0] * grid[1] * grid[2]
    img_tokens = image_tokens(px, a.vision)
    out = []
    for _ in range(n):
        ids = [t for t in torch.randint(10, hi, (text + img_tokens,), generator=g).tolist()]
        ids = [t if t not in (a.image_token_id, *(a.eos_token_ids or ())) else 10 for t in ids]
        if image:
            ids = ids[: text // 2] + [a.image_token_id] * images + ids[text // 2: text]
            out.append(Request(tokens=ids, images=[ImageInput(torch.randn(rows, a.vision.patch_dim, generator=g), grid)
                                                   for _ in range(images)]))
        else:
            out.append(Request(tokens=ids))
    return out


def first_token_ms(eng: Any, reqs: list[Any]) -> float:
    from executors import Sampling

    first = float("nan")
    t = time.perf_counter()
    for _i, tok, _r in eng.stream(reqs, max_new_tokens=1, sampling=Sampling(stop_on_eos=False)):
        if tok is not None and math.isnan(first):
            first = 1e3 * (time.perf_counter() - t)
    return first


def batch_run(eng: Any, reqs: list[Any], new: int) -> dict[str, float]:
    """All requests at t=0: TTFT and TPOT (mean gap after the first token) per request, p50; output
    tokens/s and requests/s over the whole run."""
    from bench.common import median
    from executors import Sampling

    times: dict[int, list[float]] = {i: [] for i in range(len(reqs))}
    t0 = time.perf_counter()
    for i, tok, _r in eng.stream(reqs, max_new_tokens=new, sampling=Sampling(stop_on_eos=False)):
        if tok is not None:
            times[i].append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    ttft = [t[0] for t in times.values() if t]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    done = sum(1 for t in times.values() if len(t) == new)
    return {"requests": len(reqs), "completed": done, "ttft_ms_p50": round(1e3 * median(ttft), 3),
            "ttft_ms_max": round(1e3 * max(ttft), 3) if ttft else float("nan"),
            "tpot_ms_p50": round(1e3 * median(tpot), 3), "wall_s": round(wall, 3),
            "output_tok_s": round(sum(len(t) for t in times.values()) / wall, 1), "requests_s": round(done / wall, 3)}


def case_plan(spec: Any, cost: Any, name: str, max_seqs: int, max_tokens: int, threshold: int | None = None) -> Any:
    """The case's pinned plan; ``threshold`` pins a shift case's threshold (else the cost model's)."""
    from planner.pinned import pinned_plan

    kw = dict(CASES[name])
    if threshold is not None and kw.get("shift"):
        kw["threshold"] = threshold
    return pinned_plan(spec, cost, name=f"vl-speed-{name.replace('/', '-')}", max_seqs=max_seqs,
                       max_batch_tokens=max_tokens, **kw)


def measure(plan: Any, cfg: dict, ckpt: Path, device: str, blocks: int, sizes: dict[str, Any]) -> dict[str, Any]:
    """One case's engine: load, warm up (the batch's decode graphs captured), TTFT of one image
    request and of a text request of the same length, then the batch."""
    t = time.perf_counter()
    # a hung case (a collective that never completes) must not take the run with it: after
    # ``timeout`` s its worker processes are stopped, and the engine raises for the dead ranks
    dog = threading.Timer(sizes["timeout"], _stop_workers)
    dog.daemon = True
    dog.start()
    try:
        return _measure(plan, cfg, ckpt, device, blocks, sizes, t)
    finally:
        dog.cancel()


def _stop_workers() -> None:
    import multiprocessing

    for p in multiprocessing.active_children():
        p.terminate()


def _measure(plan: Any, cfg: dict, ckpt: Path, device: str, blocks: int, sizes: dict[str, int], t: float) -> dict[str, Any]:
    import executors
    from bench.common import median
    from executors import Sampling
    from executors.config import model_args
    from executors.trace import summary  # the step trace's sums by kind of step

    m = model_args(cfg)
    px, text, batch, new, reps = sizes["px"], sizes["text"], sizes["batch"], sizes["new"], sizes["reps"]
    with executors.load(plan, weights=ckpt, device=device, kv_blocks=blocks, config=cfg, backend=sizes["backend"],
                        lookahead=sizes["lookahead"], trace=sizes["trace"]) as eng:
        out: dict[str, Any] = {"load_s": round(time.perf_counter() - t, 2)}
        greedy = Sampling(stop_on_eos=False)
        eng.generate(requests(m, 2, px, text, 100), max_new_tokens=3, sampling=greedy)  # warm-up
        eng.generate(requests(m, batch, px, text, 101), max_new_tokens=3, sampling=greedy)  # the batch's graphs
        img = [first_token_ms(eng, requests(m, 1, px, text, 200 + i)) for i in range(reps)]
        txt = [first_token_ms(eng, requests(m, 1, px, text, 300 + i, image=False)) for i in range(reps)]
        out["ttft_image_ms"] = round(median(img), 3)
        out["ttft_text_ms"] = round(median(txt), 3)
        out["image_cost_ms"] = round(out["ttft_image_ms"] - out["ttft_text_ms"], 3)
        # point 2's figures for image requests: decode TPOT at batch 1, TTFT of one long image prompt
        if eng.step_trace is not None:
            eng.step_trace.clear()
        out["tpot_b1_ms"] = batch_run(eng, requests(m, 1, px, text, 250), new)["tpot_ms_p50"]
        if eng.step_trace is not None:  # the batch-1 decode steps' phases
            out["tpot_b1_trace"] = summary(eng.step_trace)
        if sizes["long_images"]:
            lpx, k = sizes["long_px"], sizes["long_images"]
            first_token_ms(eng, requests(m, 1, lpx, text, 260, images=k))  # its shapes' warm-up
            out["ttft_long_ms"] = round(median([first_token_ms(eng, requests(m, 1, lpx, text, 270 + i, images=k))
                                                for i in range(reps)]), 3)
        if eng.step_trace is not None:
            eng.step_trace.clear()
        out["batch"] = batch_run(eng, requests(m, batch, px, text, 400), new)
        out["modes"] = dict(eng.mode_counts)
        if eng.step_trace is not None:  # where the batch's time went
            out["batch_trace"] = {"summary": summary(eng.step_trace), "steps": eng.step_trace}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny test config")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated; '' runs (a), the tower alone, only")
    ap.add_argument("--resolutions", default="448,896")
    ap.add_argument("--text", type=int, default=64, help="text tokens per request (besides the image's)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--ttft-reps", type=int, default=3)
    ap.add_argument("--tower-reps", type=int, default=10)
    ap.add_argument("--long-images", type=int, default=7,
                    help="images of the long prompt whose TTFT is measured (0: skip)")
    ap.add_argument("--long-px", type=int, default=896, help="their side in px (896: 1,024 LLM tokens each)")
    ap.add_argument("--no-tower", action="store_true", help="skip (a), the tower alone")
    ap.add_argument("--backend", default=None, help="layers: compile (default on GPUs) or eager (default with --tiny)")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="engines read each step's tokens before queueing the next (the look-ahead is on by default)")
    ap.add_argument("--trace", action="store_true",
                    help="record the batch's step trace (executors.trace): each case's JSON gets batch_trace")
    ap.add_argument("--case-timeout", type=float, default=150.0,
                    help="seconds after which a case's worker processes are stopped (the case records the error)")
    a = ap.parse_args(argv)
    if a.long_images < 0 or a.long_px <= 0:
        ap.error("--long-images must be 0 or more and --long-px positive")
    t_start = time.perf_counter()
    import transformers

    from bench.common import command_line, driver_version, matmul_rate, spec_for, write_checkpoint, write_report
    from executors.config import model_args
    from graph.hf_config import load_config
    from planner.inputs import cost_model_of

    if a.tiny:
        cfg_path = str(ROOT / "tests" / "tiny" / "qwen2_vl.json")
        cfg = json.loads(Path(cfg_path).read_text())
        spec = spec_for("tiny-qwen2-vl-2xh200", cfg_path, None, 2, "fp32", images=True, tokens=(32, 64, 8))
        device, dtype = "cpu", torch.float32
        px, res = 56, [56, 112]
        a.text, a.batch, a.new, a.long_px = min(a.text, 8), min(a.batch, 4), min(a.new, 4), 112
        a.ttft_reps, a.tower_reps = min(a.ttft_reps, 2), min(a.tower_reps, 3)
        max_seqs, max_tokens = 8, 256
    else:
        cfg = load_config(preset="qwen2-vl-7b")
        spec = spec_for("qwen2-vl-7b-2xh200", None, "qwen2-vl-7b", 2, "bf16", images=True,
                        backend=a.backend or "compile")  # priced for the layers that run
        device, dtype = "cuda", torch.bfloat16
        px, res = 448, [int(x) for x in a.resolutions.split(",")]
        max_seqs, max_tokens = 64, 8192
    a.backend = a.backend or ("eager" if a.tiny else "compile")
    m = model_args(cfg)
    cost, _ = cost_model_of(spec)
    report: dict[str, Any] = {
        "backend": a.backend, "lookahead": a.lookahead,
        "command": command_line("bench/vl_speed.py", argv),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device == "cuda" else "2 x " + (platform.processor() or "cpu"),
        "driver": driver_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": ("tiny qwen2-vl config" if a.tiny else "qwen2-vl-7b shapes") + f", {str(dtype)[6:]}, random weights",
        "sizes": {"image_px": px, "image_tokens": image_tokens(px, m.vision),
                  "text_tokens": a.text, "batch": a.batch, "new_tokens": a.new, "ttft_reps": a.ttft_reps,
                  "long_images": a.long_images, "long_px": a.long_px,
                  "long_tokens": a.long_images * image_tokens(a.long_px, m.vision) + a.text},
        "matmul": matmul_rate(device, dtype), "tower": {}, "cases": {},
    }
    rate = report["matmul"]["TFLOPs"]
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_report(a.out, "vl_speed", report, markdown(report))

    if not a.no_tower:
        report["tower"] = tower_alone(cfg, device, dtype, res, rate, a.tower_reps, 3 if device == "cuda" else 1,
                                      a.backend)
    save()
    if device == "cuda":
        torch.cuda.empty_cache()
    if not [c for c in a.cases.split(",") if c]:  # --cases '': the tower alone
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        save()
        print(markdown(report))
        return report
    ckpt = Path(tempfile.mkdtemp(prefix="vl-speed-"))
    try:
        report["checkpoint"] = write_checkpoint(cfg, ckpt, torch.device(device), dtype)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        run_cases(report, a, spec, cost, cfg, ckpt, device, max_seqs, max_tokens, save)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    ratios(report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(markdown(report))
    return report


def run_cases(report: dict[str, Any], a: Any, spec: Any, cost: Any, cfg: dict, ckpt: Path, device: str,
              max_seqs: int, max_tokens: int, save: Any) -> None:
    """Every case of ``--cases`` in turn; a failing case records its error and the next one runs."""
    from executors.config import model_args

    m = model_args(cfg)
    px, rate = report["sizes"]["image_px"], report["matmul"]["TFLOPs"]
    fl = tower_flops(m.vision, image_grid(px, m.vision), m.hidden)["total"]
    sizes = {"px": px, "text": a.text, "batch": a.batch, "new": a.new, "reps": a.ttft_reps, "timeout": a.case_timeout,
             "trace": a.trace, "long_images": a.long_images, "long_px": a.long_px,
             "backend": a.backend, "lookahead": a.lookahead}
    prompt = a.text + report["sizes"]["image_tokens"]
    for name in [c for c in a.cases.split(",") if c]:
        r: dict[str, Any] = {}
        try:
            plan = case_plan(spec, cost, name, max_seqs, max_tokens, TINY_THRESHOLD if a.tiny else None)
            enc = plan.dims().encoder(m.vision.num_heads, m.vision.mlp_dim)
            r.update(mesh=plan.mesh.label(), placement=plan.vision.placement, shift_threshold=plan.shift.threshold_tokens,
                     encoder={"stages": list(enc.stages), "tp": enc.tp, "replicas": enc.dp})
            r["image_floor_ms"] = round(1e3 * fl / (rate * 1e12 * enc.tp), 6)
            blocks = 2 * -(-a.batch * (prompt + a.new) // plan.scheduler.block_size) + 64  # KV blocks per replica
            r.update(measure(plan, cfg, ckpt, device, blocks, sizes))
            r["image_cost_x_floor"] = sig(r["image_cost_ms"] / r["image_floor_ms"])
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        report["cases"][name] = r
        print(name, json.dumps(r), flush=True)
        gc.collect()  # a one-GPU case ran in this process: give its memory back before the next
        if device == "cuda":
            torch.cuda.empty_cache()
        save()


def ratios(r: dict[str, Any]) -> None:
    """Each case's figures over ``single``'s (TTFT, TPOT: time ratios; throughput: rate ratios)."""
    one = r["cases"].get("single", {})
    if "error" in one or not one:
        return
    for x in r["cases"].values():
        if "error" in x:
            continue
        x["vs_single"] = {
            "ttft_image": sig(x["ttft_image_ms"] / one["ttft_image_ms"]),
            "batch_ttft_p50": sig(x["batch"]["ttft_ms_p50"] / one["batch"]["ttft_ms_p50"]),
            "batch_tpot_p50": sig(x["batch"]["tpot_ms_p50"] / one["batch"]["tpot_ms_p50"]),
            "batch_output_tok_s": sig(x["batch"]["output_tok_s"] / one["batch"]["output_tok_s"]),
            "tpot_b1": sig(x["tpot_b1_ms"] / one["tpot_b1_ms"]),
        }
        if "ttft_long_ms" in x and "ttft_long_ms" in one:
            x["vs_single"]["ttft_long"] = sig(x["ttft_long_ms"] / one["ttft_long_ms"])


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits."""
    if not x or math.isnan(x) or math.isinf(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def markdown(r: dict[str, Any]) -> str:
    s = r["sizes"]
    lines = [f"# Multimodal speed on two GPUs: {r['model']}", "",
             f"{r['device']}, driver {r.get('driver', '-')}, torch {r['torch']}, transformers {r['transformers']}, layers {r.get('backend', 'eager')}{'' if r.get('lookahead', True) else ' (look-ahead off)'}, decode steps as CUDA "
             f"graphs where they ran. Command: `{r['command']}`. Matmul rate measured in this run: "
             f"{r['matmul']['TFLOPs']} TFLOP/s ({r['matmul']['n']}^3 {r['matmul']['dtype']}).", "",
             f"## (a) Vision tower alone, one GPU (blocks {r.get('backend', 'eager')})", "",
             "Per image, for calls of k equal images: launched from Python, and replayed as CUDA graphs "
             "(`executors.tower_graphs`); floor = the image's FLOPs / the matmul rate.", "",
             "| image x k | patches | LLM tokens | GFLOP | floor ms | launched ms | x floor | graphs ms | x floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, x in r["tower"].items():
        if "error" in x:
            lines.append(f"| {k} | error: {x['error'][:100]} | | | | | | | |")
            continue
        ran = [x[n] for n in ("launched", "graphs") if n in x]
        cells = " | ".join(f"{y['ms_per_image']} | {y['x_floor']}" for y in ran) + (" | - | -" if len(ran) == 1 else "")
        lines.append(f"| {k} | {x['patches']} | {x['llm_tokens']} | {x['gflop']} | {x['floor_ms']} | {cells} |")
    if not r["cases"]:  # the tower alone
        return "\n".join(lines) + "\n"
    lines += ["", f"## (b) Encoder placements: one request with one {s['image_px']}x{s['image_px']} image "
              f"({s['image_tokens']} image + {s['text_tokens']} text tokens)", "",
              "Image cost = TTFT of the image request - TTFT of a text request of the same length (medians of "
              f"{s['ttft_reps']}); floor = the tower's FLOPs / (matmul rate x the tower's TP degree under the placement).",
              "", "| case | placement | tower on stages, TP x replicas | TTFT image | vs one GPU | TTFT text | image cost | "
              f"floor | x floor | {s['batch']} requests: output tok/s | vs one GPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["cases"].items():
        if "error" in x:
            lines.append(f"| {name} | error: {x['error'][:100]} | | | | | | | | | |")
            continue
        e, v = x["encoder"], x.get("vs_single", {})
        lines.append(f"| {name} | {x['placement']} | {e['stages'] or 'dedicated GPU'}, {e['tp']} x {e['replicas']} | "
                     f"{x['ttft_image_ms']} ms | {v.get('ttft_image', '-')}x | {x['ttft_text_ms']} ms | {x['image_cost_ms']} ms | {x['image_floor_ms']} ms | "
                     f"{x['image_cost_x_floor']} | {x['batch']['output_tok_s']} | {v.get('batch_output_tok_s', '-')}x |")
    lines += ["", f"## (c) Meshes: {s['batch']} requests at once, one {s['image_px']}x{s['image_px']} image each, "
              f"{s['new_tokens']} new tokens", "",
              "| case | mesh | TTFT p50 | vs one GPU | TPOT p50 | vs one GPU | output tok/s | vs one GPU | requests/s "
              "| modes run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["cases"].items():
        if "error" in x:
            continue
        b, v = x["batch"], x.get("vs_single", {})
        lines.append(f"| {name} | {x['mesh']}{' shift ' + str(x['shift_threshold']) if x['shift_threshold'] is not None else ''} | "
                     f"{b['ttft_ms_p50']} ms | {v.get('batch_ttft_p50', '-')}x | {b['tpot_ms_p50']} ms | "
                     f"{v.get('batch_tpot_p50', '-')}x | {b['output_tok_s']} | {v.get('batch_output_tok_s', '-')}x | "
                     f"{b['requests_s']} | {x['modes']} |")
    traced = {n: x["batch_trace"]["summary"] for n, x in r["cases"].items() if "batch_trace" in x}
    if traced:
        cols = ("send_ms", "unpickle_ms", "images_host_ms", "images_gpu_ms", "forward_gpu_ms", "wait_ms",
                "round_trip_ms")
        lines += ["", "## (d) Where the batch's time went (`--trace`, `executors.trace`)", "",
                  "Per kind of step, each time summed over the batch's steps (ms; rank times on the reporting rank, "
                  "summed over replicas); span: first step sent to last answer.", "",
                  "| case | steps | span ms | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for name, t in traced.items():
            for kind in ("image", "prefill", "decode"):
                if kind in t:
                    lines.append(f"| {name} | {t[kind]['steps']} {kind} | {t['all']['span_ms']} | "
                                 + " | ".join(str(t[kind].get(c, "-")) for c in cols) + " |")
    lines += ["", "## (e) The two-GPU targets with images (issue 12, points 2 and 3)", "",
              f"TPOT at batch 1: one request with one {s['image_px']}x{s['image_px']} image, {s['new_tokens']} new tokens "
              f"(mean gap after the first). Long prompt: one request with {s.get('long_images', 0)} images of "
              f"{s.get('long_px', '-')}x{s.get('long_px', '-')} px ({s.get('long_tokens', '-')} tokens), TTFT median of "
              f"{s['ttft_reps']}. Throughput: the {s['batch']}-request batch of (c). Targets: TP2 TPOT <= 0.65x; "
              "SP2 TTFT <= 0.65x; shift both within 10%; PP2 throughput >= 1.5x; DP2 >= 1.8x.", "",
              "| case | TPOT batch 1 | vs one GPU | TTFT long prompt | vs one GPU | output tok/s | vs one GPU |",
              "|---|---|---|---|---|---|---|"]
    for name, x in r["cases"].items():
        if "error" in x or "tpot_b1_ms" not in x:
            continue
        v = x.get("vs_single", {})
        lines.append(f"| {name} | {x['tpot_b1_ms']} ms | {v.get('tpot_b1', '-')}x | {x.get('ttft_long_ms', '-')} ms | "
                     f"{v.get('ttft_long', '-')}x | {x['batch']['output_tok_s']} | {v.get('batch_output_tok_s', '-')}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
