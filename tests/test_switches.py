"""The engine's on/off switches (executors.switches): 0 / 1 / unset / anything else."""

import pytest

from executors import switches


@pytest.mark.parametrize("name", sorted(switches.DEFAULTS))
def test_each_switch_reads_0_1_and_its_default(name, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert switches.switch(name) is switches.DEFAULTS[name]
    monkeypatch.setenv(name, "0")
    assert switches.switch(name) is False
    monkeypatch.setenv(name, "1")
    assert switches.switch(name) is True


def test_a_bad_value_warns_naming_the_variable_and_keeps_the_default(monkeypatch):
    monkeypatch.setenv("SHIFTPLAN_A2A_LL", "yes")
    with pytest.warns(UserWarning, match="SHIFTPLAN_A2A_LL='yes' is not 0 or 1"):
        assert switches.switch("SHIFTPLAN_A2A_LL") is switches.DEFAULTS["SHIFTPLAN_A2A_LL"]


def test_every_switch_the_engine_reads_is_in_the_table():
    """No module reads a SHIFTPLAN_ on/off variable around the table (each fact written once)."""
    import re
    from pathlib import Path

    root = Path(switches.__file__).parent
    read = set()
    for f in root.glob("*.py"):
        read |= set(re.findall(r'switch\("(SHIFTPLAN_\w+)"\)', f.read_text()))
        assert not re.search(r'os\.environ\.get\("SHIFTPLAN_(GEMV|PDL|FP8|FUSED|REDUCE|A2A)', f.read_text()), f.name
    assert read == set(switches.DEFAULTS)
