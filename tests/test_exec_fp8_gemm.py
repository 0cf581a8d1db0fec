"""The Triton kernels of FP8-weight decode products (``executors.fp8_gemm``: W8A16, and W8A8 in
``executors.fp8_w8a8``), checked on CPU.

The kernels run through Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``) against the
dequantized reference ``x @ (q * scale[:, None])^T`` in fp32 (the W8A8 kernel also against the same
product of its e4m3 activations, and its quantization against torch's e4m3 cast); the routing
(``wanted``, ``kernel_name``, ``quant.kernel_for``) is checked on fake CUDA tensors with the device
capability stubbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from executors import fp8_gemm, quant
from tests.tiny.helpers import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

KERNEL_CHECK = """
import torch
from executors import fp8_gemm, quant
torch.manual_seed(0)
F8 = torch.float8_e4m3fn
worst = {}

def err(got, want):
    return float((got.float() - want).abs().max() / want.abs().max())

# (M, N, K, dtype, path, config): rows 1 to 40, N and K not multiples of the tile (masked edges);
# the interpreter's tl.dot is wrong for bf16 operands, so the tensor-core tiling is checked in fp16
CASES = [(1, 40, 64, torch.bfloat16, "gemv", (8, 32, 4)), (3, 33, 96, torch.bfloat16, "gemv", (16, 64, 4)),
         (3, 33, 96, torch.float16, "gemv", (4, 32, 4)), (16, 24, 48, torch.float16, "gemv", (8, 32, 8)),
         (17, 72, 80, torch.float16, "mma", (16, 32, 32, 4, 1)), (17, 72, 80, torch.float16, "mma", (32, 64, 64, 4, 1)),
         (40, 50, 160, torch.float16, "mma", (16, 32, 64, 4, 1)), (40, 50, 160, torch.float16, "mma", (64, 16, 32, 4, 1)),
         (3, 33, 96, torch.float16, "mma", (16, 16, 32, 4, 1))]
for M, N, K, dt, path, cfg in CASES:
    x = torch.randn(M, K).to(dt)
    q = (torch.randn(N, K) * 40).to(F8)  # e4m3 values over a wide range
    s = torch.rand(N) * 0.02 + 0.001
    want = x.float() @ (q.float() * s[:, None]).t()
    got = fp8_gemm.launch(x, q, s, config=cfg, path=path)
    assert got.dtype == dt and got.shape == (M, N), (got.dtype, got.shape)
    key = str(dt).split(".")[-1]
    worst[key] = max(worst.get(key, 0.0), err(got, want))

# quant.linear routes here (the op pinned to one tile: the autotuner needs a GPU): a [2, 3, K]
# input; with a bias it takes the dequantizing path and adds the bias after
orig = fp8_gemm.launch
fp8_gemm.launch = lambda x, q, s: orig(x, q, s, config=(8, 32, 4), path="gemv")
fp8_gemm.wanted = lambda x, q, s: True
w = quant.quantize(torch.randn(24, 64))
x = torch.randn(2, 3, 64).half()
b = torch.randn(24).half()
want = x.float() @ w.dequantize().t()
for bias in (None, b):
    got = quant.linear(x, w, bias)
    ref = want + (bias.float() if bias is not None else 0)
    assert got.shape == (2, 3, 24) and got.dtype == torch.float16
    worst["float16"] = max(worst["float16"], err(got, ref))
print(worst["bfloat16"], worst["float16"])
"""


def test_fp8_kernel_matches_dequantized_reference() -> None:
    """Both tilings against ``x @ (q * scale)^T`` in fp32 within one rounding of the output dtype
    (bf16: 2^-8 relative, fp16: 2^-11): rows 1, 3, 16, 17 and 40, edges masked in N and K; and
    ``quant.linear`` of an ``Fp8Weight`` through the op, without and with a bias."""
    bf16, fp16 = map(float, run_interpreted("-c", KERNEL_CHECK).split()[-2:])
    assert bf16 < 2 ** -7 and fp16 < 2 ** -9, (bf16, fp16)


W8A8_CHECK = """
import torch
from executors import fp8_gemm, fp8_w8a8, quant
torch.manual_seed(0)
F8 = torch.float8_e4m3fn
worst = {"xq": 0.0, "xs": 0.0, "bfloat16": 0.0, "float16": 0.0, "float": 0.0, "scaled_mm": 0.0}

def err(got, want):
    return float((got.float() - want).abs().max() / want.abs().max())

# the per-row quantization against torch's: xs = max|row| / 448 (1e-12 for a row of zeros), e4m3 of
# x * (1 / xs) rounded to nearest even, normal and subnormal e4m3 values, K over several steps
for M, K, dt in [(6, 48, torch.bfloat16), (4, 2100, torch.float16), (9, 304, torch.bfloat16)]:
    x = (torch.randn(M, K) * torch.logspace(-3, 2, M)[:, None]).to(dt)
    x[0] = 0
    xs, xq = fp8_w8a8.row_scale(x, True)
    rxs = (x.float().abs().amax(1) / 448).clamp(min=1e-12)
    rxq = (x.float() * (1 / rxs)[:, None]).clamp(-448, 448).to(F8)
    worst["xs"] = max(worst["xs"], float((xs - rxs).abs().max()))
    worst["xq"] = max(worst["xq"], float((xq.float() != rxq.float()).sum()))
    assert fp8_w8a8.row_scale(x, False)[1] is None and torch.equal(fp8_w8a8.row_scale(x, False)[0], xs)

# the product (M, N, K, dtype, tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K), x quantized in
# the loads): rows 17 to 130, N and K not multiples of the tile, K split 2, 4 and 8 ways (splits past K empty)
CASES = [(33, 50, 160, torch.bfloat16, (32, 64, 64, 4, 1, 1), True),
         (40, 72, 96, torch.float16, (32, 32, 32, 4, 1, 2), True),
         (70, 24, 208, torch.bfloat16, (64, 16, 64, 4, 1, 4), False),
         (130, 40, 64, torch.float16, (128, 32, 32, 4, 1, 1), False),
         (17, 33, 48, torch.bfloat16, (16, 16, 32, 4, 1, 8), True),
         (64, 48, 128, torch.float16, (32, 32, 32, 4, 1, 4), False)]
for M, N, K, dt, cfg, fused in CASES:
    x = torch.randn(M, K).to(dt)
    q = (torch.randn(N, K) * 40).to(F8)
    s = torch.rand(N) * 0.02 + 0.001
    xs, xq = fp8_w8a8.row_scale(x, True)
    want = (xq.float() @ q.float().t()) * xs[:, None] * s[None, :]
    full = x.float() @ (q.float() * s[:, None]).t()
    w = quant.Fp8Weight(q, s)
    got = fp8_w8a8.launch(x, q, s, config=cfg, fused=fused)
    assert got.dtype == dt and got.shape == (M, N), (got.dtype, got.shape)
    key = str(dt).split(".")[-1]
    worst[key] = max(worst[key], err(got, want))
    worst["float"] = max(worst["float"], err(got, full))
    worst["scaled_mm"] = max(worst["scaled_mm"], err(quant.w8a8_rowwise(x, w), full))  # torch._scaled_mm's path
    assert fp8_w8a8._counters[x.device].abs().sum() == 0  # split-K counters back to zero

# fp8_gemm.launch routes rows above W8A16_MAX_M here
x = torch.randn(40, 64).half()
q, s = (torch.randn(24, 64) * 40).to(F8), torch.rand(24) * 0.02 + 0.001
a = fp8_gemm.launch(x, q, s, config=(32, 32, 32, 4, 1, 1))
b = fp8_w8a8.launch(x, q, s, config=(32, 32, 32, 4, 1, 1), fused=True)
assert torch.equal(a, b) and fp8_gemm.kernel_name(40) == "triton_w8a8" and fp8_gemm.kernel_name(32) == "triton_w8a16"
print(worst["xs"], worst["xq"], worst["bfloat16"], worst["float16"], worst["float"], worst["scaled_mm"])
"""


def test_w8a8_kernel_matches_references() -> None:
    """The W8A8 kernel (``executors.fp8_w8a8``) through the interpreter: its per-row scales and e4m3
    activations equal torch's (``x * (1 / xs)`` cast to e4m3, round to nearest even); its product
    equals ``(xq @ q^T) * xs * scale`` of those activations within one rounding of the output dtype
    (the interpreter's bf16 cast truncates: 2^-7; fp16: 2^-9), x quantized in the loads or before, K split 1-8 ways; against the float reference (x unquantized)
    within the FP8 tolerance of the engine's tests (6%) and within 1.5x the error of the
    ``torch._scaled_mm`` path (``quant.w8a8_rowwise``) on the same inputs. The interpreter runs
    ``tl.dot`` on e4m3 operands (exact products, fp32 sums); what it cannot show is the GPU's
    scheduling (split-K's counter ordering, tile shapes that do not compile)."""
    xs, xq, bf16, fp16, full, scaled_mm = map(float, run_interpreted("-c", W8A8_CHECK).split()[-6:])
    assert xs == 0 and xq == 0, (xs, xq)
    assert bf16 < 2 ** -7 and fp16 < 2 ** -9, (bf16, fp16)
    assert full < 0.06 and full < 1.5 * scaled_mm, (full, scaled_mm)


def _fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_fp8_products_are_routed_by_rows_dtype_and_capability(monkeypatch) -> None:
    """``wanted`` (and ``quant.kernel_for``): CUDA bf16/fp16 rows up to MAX_M with a contiguous e4m3
    weight and K a multiple of 16 on an FP8-capable GPU go to the kernels (W8A16 up to W8A16_MAX_M
    rows, W8A8 above), the rest to ``torch._scaled_mm`` (or the widened weight without FP8 tensor
    cores); the fake kernel gives the output shape (what compiled layers trace)."""
    top, mid = fp8_gemm.MAX_M, fp8_gemm.W8A16_MAX_M
    assert fp8_gemm.GEMV_MAX_M < mid < top
    q, s = torch.zeros(32, 64, dtype=fp8_gemm.FP8), torch.ones(32)
    assert not fp8_gemm.wanted(torch.zeros(1, 64, dtype=torch.bfloat16), q, s)  # CPU
    assert quant.kernel_for(torch.zeros(1, 64), quant.Fp8Weight(q, s)) == "dequant"
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a: cap["v"])
    with FakeTensorMode():
        q, s = _fake(32, 64, dtype=fp8_gemm.FP8), _fake(32, dtype=torch.float32)
        w = quant.Fp8Weight(q, s)
        assert fp8_gemm.wanted(_fake(1, 64), q, s) and fp8_gemm.wanted(_fake(top, 64, dtype=torch.float16), q, s)
        assert fp8_gemm.wanted(_fake(2, top // 2, 64), q, s) and not fp8_gemm.wanted(_fake(2, top, 64), q, s)  # leading dims
        assert quant.kernel_for(_fake(mid, 64), w) == "triton_w8a16"
        assert quant.kernel_for(_fake(mid + 1, 64), w) == "triton_w8a8" == quant.kernel_for(_fake(top, 64), w)
        assert quant.kernel_for(_fake(2, (mid + 2) // 2, 64), w) == "triton_w8a8"  # rows over the leading dims
        assert not fp8_gemm.wanted(_fake(top + 1, 64), q, s)
        assert quant.kernel_for(_fake(top + 1, 64), w) == "scaled_mm_rowwise"
        assert not fp8_gemm.wanted(_fake(4, 64, dtype=torch.float32), q, s)
        x_strided = torch.empty_strided((4, 64), (128, 2), dtype=torch.bfloat16, device="cuda")
        assert not fp8_gemm.wanted(x_strided, q, s)  # x rows not of unit stride
        q_t = torch.empty_strided((32, 64), (1, 32), dtype=fp8_gemm.FP8, device="cuda")
        assert not fp8_gemm.wanted(_fake(4, 64), q_t, s)  # q not contiguous
        assert not fp8_gemm.wanted(_fake(4, 64), _fake(32, 64), s)  # a bf16 weight is gemv's
        assert not fp8_gemm.wanted(_fake(4, 64), q, _fake(32))  # bf16 scales
        q40 = _fake(32, 40, dtype=fp8_gemm.FP8)
        assert not fp8_gemm.wanted(_fake(4, 40), q40, s)  # K not a multiple of 16
        assert torch.ops.shiftplan.fp8_linear(_fake(3, 64), q, s).shape == (3, 32)
        monkeypatch.setattr(fp8_gemm, "ENABLED", False)
        assert not fp8_gemm.wanted(_fake(1, 64), q, s)
        assert quant.kernel_for(_fake(1, 64), w) == "scaled_mm_rowwise"
        monkeypatch.setattr(fp8_gemm, "ENABLED", True)
        cap["v"] = (8, 0)  # A100: no e4m3 conversions or FP8 tensor cores
        assert not fp8_gemm.wanted(_fake(1, 64), q, s)
        assert quant.kernel_for(_fake(1, 64), w) == "dequant"


@pytest.mark.parametrize("value,enabled", [("0", False), ("1", True)])
def test_fp8_kernel_switch(value: str, enabled: bool) -> None:
    """``SHIFTPLAN_FP8_GEMM=0`` at import keeps every FP8 product on ``torch._scaled_mm``."""
    env = dict(os.environ, SHIFTPLAN_FP8_GEMM=value, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "from executors import fp8_gemm; print(fp8_gemm.ENABLED)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == str(enabled), out.stderr[-2000:]


@pytest.mark.parametrize("value,top", [("0", 32), ("1", 64)])
def test_w8a8_switch(value: str, top: int) -> None:
    """``SHIFTPLAN_FP8_W8A8=0`` at import serves only the W8A16 rows (up to ``W8A16_MAX_M``) in Triton,
    the larger products on ``torch._scaled_mm``."""
    env = dict(os.environ, SHIFTPLAN_FP8_W8A8=value, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "from executors import fp8_gemm; print(fp8_gemm.MAX_M)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == str(top), out.stderr[-2000:]


def test_w8a8_tiles_kept_per_row_bucket() -> None:
    """The W8A8 autotuner's candidates per (N, row bucket): tiles no taller than the rows (rounded up
    to 16) nor shorter than a sixteenth of them; K split only up to 256 rows, within the workspace
    (``split_max``: 8 ways for a 70B TP8 ``qkv`` shard at 64 rows, none at 512 rows)."""
    from executors import fp8_w8a8

    def kept(mb: int, n: int) -> list:
        return fp8_w8a8._fits(fp8_w8a8._tuned.configs, {"M_BLOCK": mb, "N": n, "WS_SPLITS": fp8_w8a8.split_max(n, mb)})

    assert fp8_w8a8.split_max(1280, 64) == 8 and fp8_w8a8.split_max(1280, 512) == 1
    assert fp8_w8a8.split_max(28672, 256) == 1 and fp8_w8a8.split_max(7168, 64) == 4
    for mb, n in [(64, 1280), (128, 7168), (256, 1280), (512, 28672), (1024, 8192), (32, 24)]:
        cs = kept(mb, n)
        assert cs and all(mb // 16 <= c.kwargs["BLOCK_M"] <= max(16, mb) for c in cs), (mb, n)
        assert all(c.kwargs["SPLIT_K"] <= fp8_w8a8.split_max(n, mb) for c in cs)
        ws = max(c.kwargs["SPLIT_K"] for c in cs) * mb * n * 4
        assert ws == 4 * mb * n or ws <= fp8_w8a8.WORKSPACE_BYTES
    assert max(c.kwargs["SPLIT_K"] for c in kept(64, 1280)) == 8
    assert {c.kwargs["BLOCK_M"] for c in kept(1024, 8192)} == {64, 128}
