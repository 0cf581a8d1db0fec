"""Hardware catalog: every required part, sane datasheet figures, inline GPUs, clear errors."""

import pytest

from costmodels.gpu import GPU
from costmodels.hardware import CATALOG, dtype_bytes, get_gpu, matmul_tflops
from plans.errors import UserError

REQUIRED = ["h100", "h200", "a100-80g", "b200", "mi300x", "mi325x", "mi355x", "l40s", "cpu"]


@pytest.mark.parametrize("name", REQUIRED)
def test_catalog_has_part_with_source(name):
    g = get_gpu(name)
    assert g.name == name
    assert g.bf16_tflops > 0 and g.hbm_gb > 0 and g.hbm_tbps > 0 and g.link_gbps > 0 and g.inter_node_gbps > 0
    assert g.source and g.source != "inline spec"


def test_datasheet_figures():
    h100, h200, a100 = get_gpu("h100"), get_gpu("h200"), get_gpu("a100-80g")
    assert h100.bf16_tflops == pytest.approx(989.4) and h100.hbm_gb == 80 and h100.hbm_tbps == pytest.approx(3.35)
    assert h200.hbm_gb == 141 and h200.hbm_tbps == pytest.approx(4.8)
    assert a100.fp8_tflops is None and a100.int4_tops == 1248
    # fp8 doubles the dense rate on every part that has it
    for g in CATALOG.values():
        if g.fp8_tflops and g.name != "cpu":
            assert g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=0.03), g.name


def test_aliases_and_case():
    assert get_gpu("H100").name == "h100"
    assert get_gpu("a100").name == "a100-80g"


def test_unknown_gpu_names_nearest():
    with pytest.raises(UserError) as e:
        get_gpu("h10")
    msg = str(e.value)
    assert "h100" in msg and "catalog" in msg


def test_inline_gpu_passes_through():
    g = GPU(name="x1", bf16_tflops=100, hbm_gb=32, hbm_tbps=1.0, link_gbps=50)
    assert get_gpu(g) is g


def test_dtype_rates():
    h100 = get_gpu("h100")
    assert matmul_tflops(h100, "fp8") == h100.fp8_tflops
    assert matmul_tflops(h100, "int4") == h100.bf16_tflops  # weight-only quantisation
    assert matmul_tflops(get_gpu("a100-80g"), "fp8") == 312  # no fp8 cores: bf16 path
    assert dtype_bytes("int4") == 0.5 and dtype_bytes("fp8") == 1
    with pytest.raises(UserError):
        dtype_bytes("fp6")


def test_plan_contract_lists_the_catalog():
    from costmodels.hardware import ALIASES, CATALOG
    from plans.gpu import ALIASES as PLAN_ALIASES
    from plans.gpu import CATALOG_NAMES

    assert tuple(CATALOG) == CATALOG_NAMES and ALIASES is PLAN_ALIASES
