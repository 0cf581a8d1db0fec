"""``bench/blas_library.py`` on CPU: a layer's per-row-count sums, the cuBLASLt / cuBLAS ratio and the
per-step figures, the markdown's rows, its mark for outputs that disagree and its kernel names cut at their
template arguments, and bad arguments exit 2."""

from __future__ import annotations

import pytest

from bench import blas_library as bl


def _per(lt_o: float, agree: bool = True) -> dict:
    p = {"qkv": {"floor_us": 10.0, "cublas_us": 20.0, "cublaslt_us": 16.0},
         "o": {"floor_us": 5.0, "cublas_us": 10.0, "cublaslt_us": lt_o}}
    for x in p.values():
        x.update(runs_us={"cublas": [x["cublas_us"]] * 2, "cublaslt": [x["cublaslt_us"]] * 2}, agree=True)
    p["o"]["agree"] = agree
    return p


def test_layer_sums_and_markdown():
    s = bl.layer_sums(_per(8.0), layers=32)
    assert s["floor_us"] == 15.0 and s["cublas_us"] == 30.0 and s["cublaslt_us"] == 24.0
    assert s["lt_over_cublas"] == 0.8
    assert s["step_ms"] == {"floor": 0.48, "cublas": 0.96, "cublaslt": 0.768}
    per = {"1": _per(8.0), "8": _per(14.0, agree=False)}
    shard = {"model": "m", "tp": 2, "layers": 32, "shapes": {"qkv": [6, 4], "o": [4, 4]}, "per": per,
             "layer": {M: bl.layer_sums(p, 32) for M, p in per.items()}}
    md = bl.markdown({"device": "GPU", "driver": "-", "torch": "-", "cuda": "-", "command": "c", "copy_GBps": 1.0,
                      "tolerance": 0.01, "all_agree": False, "shards": [shard],
                      "kernels": {"m tp2 o 8": {"cublas": ["k1", "void reduce<32, float>(float const*)"],
                                                "cublaslt": ["k2"]}}})
    assert "## m (tp2): qkv 6 x 4, o 4 x 4" in md
    assert "| 1 | 15.0 | 30.0 | 24.0 | 0.8 | 0.48 | 0.96 | 0.768 | 20.0 / 16.0 | 10.0 / 8.0 |" in md
    assert "| 8 | 15.0 | 30.0 | 30.0 | 1.0 |" in md and "10.0 / 14.0 (!) |" in md and "20.0 / 16.0 (!)" not in md
    assert "each other: NOT all." in md and "- m tp2 o 8: cublas: k1 + reduce; cublaslt: k2" in md


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bl.main(["--out", str(tmp_path), "--models", "llama-3.1-8b"])
    assert e.value.code == 2 and "--models 'llama-3.1-8b'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bl.main(["--out", str(tmp_path), "--rows", "1,x"])
    assert e.value.code == 2 and "--rows '1,x'" in capsys.readouterr().err
