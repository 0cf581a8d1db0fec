"""How many times the paged prefill kernels compile for steps of new sizes: the kernels as Triton
specialises them by default (every integer argument on its divisibility by 16 and on 1) against the
engine's (``executors.paged_prefill``: the step's token count, its table's width and range length not
specialised on). Each case is one prefill of T tokens over a table of W blocks; printed: the compiled
variants of ``_prefill`` and ``_combine`` after all cases, and each case's first-call time (ms), a
compile where it is near a second. Then what not specialising costs a call, both variants warm, on
mixed steps' shapes with Qwen2-VL-7B's heads (chunks after cached keys): the fastest of three rounds
of 30 calls each. One H200.

    python bench/prefill_variants.py        # bench/results/prefill_variants.txt
"""
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from executors import paged_prefill as pp  # noqa: E402

DEV, HQ, HKV, D, BS = "cuda", 32, 8, 128, 16  # Llama-3.1-8B's heads, bf16, the engine's KV block
CASES = [(1000, 64), (1008, 64), (1024, 64), (1001, 128), (3072, 256), (3000, 256), (2999, 250), (4096, 512),
         (4001, 512)]  # (tokens, table width in blocks)


def variants(fn) -> int:
    """Kernels a Triton ``JITFunction`` has compiled so far (all devices)."""
    dc = getattr(fn, "device_caches", None)
    return sum(len(v[0]) for v in dc.values()) if dc else sum(len(c) for c in fn.cache.values())


def first_call_ms(T: int, width: int) -> float:
    """One prefill of ``T`` tokens over a table of ``width`` blocks through ``paged_prefill.attend``."""
    q = torch.randn(T, HQ, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(width * BS + 1, HKV, D, device=DEV, dtype=torch.bfloat16)
    x = pp.PrefillInputs.build([(0, T, 0, T)], [list(range(width))], BS, torch.device(DEV))
    torch.cuda.synchronize()
    t = time.perf_counter()
    pp.attend(q, k, k, x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def call_ms(kernels: dict[str, tuple], T: int, width: int, seqs: int, hq: int = 28, hkv: int = 4) -> dict[str, float]:
    """Per call and kernel pair of ``kernels``: ``T`` query tokens in ``seqs`` equal chunks, each after
    ``width`` blocks of cached keys less 7 (its table ``width`` blocks wide); the fastest of 3 rounds of
    30 calls, the pairs alternating round by round."""
    q = torch.randn(T, hq, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(width * BS * seqs + 1, hkv, D, device=DEV, dtype=torch.bfloat16)
    n = T // seqs
    x = pp.PrefillInputs.build([(i * n, n, 0, width * BS - 7) for i in range(seqs)],
                               [list(range(i * width, (i + 1) * width)) for i in range(seqs)], BS, torch.device(DEV))
    best = {label: float("inf") for label in kernels}
    for _ in range(3):
        for label, fns in kernels.items():
            pp._prefill, pp._combine = fns
            pp.attend(q, k, k, x)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(30):
                pp.attend(q, k, k, x)
            b.record()
            torch.cuda.synchronize()
            best[label] = min(best[label], a.elapsed_time(b) / 30)
    return {label: round(v, 4) for label, v in best.items()}


def main() -> None:
    engine = pp._prefill, pp._combine
    default = triton.jit(engine[0].fn), triton.jit(engine[1].fn)
    for label, fns in (("default specialisation", default), ("do_not_specialize", engine)):
        pp._prefill, pp._combine = fns
        ms = [round(first_call_ms(T, w), 1) for T, w in CASES]
        print(label, "variants", variants(fns[0]), variants(fns[1]), "first-call ms", ms)
    for T, width, seqs in [(256, 64, 2), (512, 128, 4), (1024, 256, 2), (2048, 320, 4), (3072, 256, 4), (1792, 128, 1)]:
        print(T, width, seqs, call_ms({"default": default, "dns": engine}, T, width, seqs))
    pp._prefill, pp._combine = engine


if __name__ == "__main__":
    main()
