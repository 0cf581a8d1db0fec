"""How many times the paged prefill kernels compile for steps of new sizes: the kernels as Triton
specialises them by default (every integer argument on its divisibility by 16 and on 1) against the
engine's (``executors.paged_prefill``: the step's token count, its table's width and range length not
specialised on). Each case is one prefill of T tokens over a table of W blocks; printed: the compiled
variants of ``_prefill`` and ``_combine`` after all cases, and each case's first-call time (ms), a
compile where it is near a second. One H200.

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


def main() -> None:
    engine = pp._prefill, pp._combine
    default = triton.jit(engine[0].fn), triton.jit(engine[1].fn)
    for label, fns in (("default specialisation", default), ("do_not_specialize", engine)):
        pp._prefill, pp._combine = fns
        ms = [round(first_call_ms(T, w), 1) for T, w in CASES]
        print(label, "variants", variants(fns[0]), variants(fns[1]), "first-call ms", ms)
    pp._prefill, pp._combine = engine


if __name__ == "__main__":
    main()
