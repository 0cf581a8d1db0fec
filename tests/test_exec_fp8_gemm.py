"""The Triton W8A16 kernel of FP8-weight decode products (``executors.fp8_gemm``), checked on CPU.

The kernel runs through Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``) against the
dequantized reference ``x @ (q * scale[:, None])^T`` in fp32; the routing (``wanted``,
``quant.kernel_for``) is checked on fake CUDA tensors with the device capability stubbed.
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
    r = torch.randn(M, 2 * N).to(dt)[:, :N]  # a residual with a row stride of 2 N
    want = x.float() @ (q.float() * s[:, None]).t()
    got = fp8_gemm.launch(x, q, s, config=cfg, path=path)
    assert got.dtype == dt and got.shape == (M, N), (got.dtype, got.shape)
    key = str(dt).split(".")[-1]
    worst[key] = max(worst.get(key, 0.0), err(got, want))
    got = fp8_gemm.launch(x, q, s, r, config=cfg, path=path)
    worst[key] = max(worst[key], err(got, want + r.float()))

# quant.linear routes here (the op pinned to one tile: the autotuner needs a GPU): a [2, 3, K]
# input, the residual fused when its rows have unit stride and added after when not, a bias added after
orig = fp8_gemm.launch
fp8_gemm.launch = lambda x, q, s, r=None: orig(x, q, s, r, config=(8, 32, 4), path="gemv")
fp8_gemm.wanted = lambda x, q, s: True
w = quant.quantize(torch.randn(24, 64))
x = torch.randn(2, 3, 64).half()
r = torch.randn(2, 3, 24).half()
b = torch.randn(24).half()
want = x.float() @ w.dequantize().t()
for res, bias in [(None, None), (r, None), (r.transpose(0, 1).contiguous().transpose(0, 1), None), (r[..., :24], b)]:
    got = quant.linear(x, w, bias, residual=res)
    ref = want + (res.float() if res is not None else 0) + (bias.float() if bias is not None else 0)
    assert got.shape == (2, 3, 24) and got.dtype == torch.float16
    worst["float16"] = max(worst["float16"], err(got, ref))
print(worst["bfloat16"], worst["float16"])
"""


def test_fp8_kernel_matches_dequantized_reference() -> None:
    """Both tilings against ``x @ (q * scale)^T`` in fp32 within one rounding of the output dtype
    (bf16: 2^-8 relative, fp16: 2^-11): rows 1, 3, 16, 17 and 40, edges masked in N and K, with and
    without the residual (rows 2 N apart); and ``quant.linear`` of an
    ``Fp8Weight`` through the op, with the residual fused or added after and a bias."""
    bf16, fp16 = map(float, run_interpreted("-c", KERNEL_CHECK).split()[-2:])
    assert bf16 < 2 ** -7 and fp16 < 2 ** -9, (bf16, fp16)


def _fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_fp8_products_are_routed_by_rows_dtype_and_capability(monkeypatch) -> None:
    """``wanted`` (and ``quant.kernel_for``): CUDA bf16/fp16 rows up to MAX_M with a contiguous e4m3
    weight and K a multiple of 16 on an FP8-capable GPU go to the kernel, the rest to
    ``torch._scaled_mm`` (or the widened weight without FP8 tensor cores); the fake kernel gives the
    output shape (what compiled layers trace)."""
    top = fp8_gemm.MAX_M
    assert fp8_gemm.GEMV_MAX_M < top
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
        assert quant.kernel_for(_fake(top, 64), w) == "triton_w8a16"
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
        assert torch.ops.shiftplan.fp8_linear(_fake(3, 64), q, s, _fake(3, 32)).shape == (3, 32)
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
