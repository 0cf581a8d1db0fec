"""Traces people already have load as they are, the format detected from the header (or the
JSONL keys): Azure LLM 2023/2024, Azure LMM 2025, BurstGPT, Mooncake / vLLM bench JSONL. The
samples are written here, in each format's own layout. Property tests: any text, any bytes, any
table of values either loads or gives a UserError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costmodels.workload import TRACE_FORMATS, from_trace, read_trace
from graph.cache import load_or_trace
from graph.hf_config import load_config
from plans.errors import UserError


@pytest.fixture(scope="module")
def vl_info():
    return load_or_trace(load_config("qwen2-vl-7b")).graph.info


AZURE_LLM = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
             "2023-11-16 18:15:46.6805900,374,44\n"
             "2023-11-16 18:15:50.9951690,396,109\n"
             "2023-11-16 18:15:51.5803620,879,3\n")
AZURE_LMM = ("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
             "2025-03-01 00:00:00.0000000,0,500,20\n"
             "2025-03-01 00:00:01.5000000,2,4000,30\n"
             "2025-03-01 00:00:03.0000000,1,2000,40\n")
BURSTGPT = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "5,ChatGPT,472,18,490,Conversation log\n"
            "45,ChatGPT,1087,0,1087,Conversation log\n"
            "118,GPT-4,417,276,693,API log\n")
MOONCAKE = "".join(json.dumps(r) + "\n" for r in (
    {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1, 2]},
    {"timestamp": 2500, "input_length": 6472, "output_length": 26, "hash_ids": [0, 3]},
    {"timestamp": 7000, "input_length": 100, "output_length": 5, "hash_ids": []},
))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_llm(tmp_path):
    wl = from_trace(_write(tmp_path, "a.csv", AZURE_LLM))
    assert wl.trace_format == "Azure LLM 2023/2024"
    reqs = wl.sample()
    assert [(r.text_tokens, r.output_tokens) for r in reqs] == [(374, 44), (396, 109), (879, 3)]
    assert reqs[1].arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)


def test_azure_lmm_counts_images_inside_the_context(tmp_path, vl_info):
    wl = from_trace(_write(tmp_path, "m.csv", AZURE_LMM), info=vl_info)
    assert wl.trace_format == "Azure LMM 2025 (multimodal)"
    reqs = wl.sample()
    assert [len(r.image_tokens) for r in reqs] == [0, 2, 1]
    assert [r.prompt_tokens for r in reqs] == [500, 4000, 2000]  # ContextTokens include the image tokens
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 1.5, 3.0])


def test_burstgpt(tmp_path):
    wl = from_trace(_write(tmp_path, "b.csv", BURSTGPT))
    assert wl.trace_format == "BurstGPT"
    reqs = wl.sample()
    assert [r.arrival_s for r in reqs] == [0.0, 40.0, 113.0]  # seconds, relative to the first
    assert [(r.text_tokens, r.output_tokens) for r in reqs] == [(472, 18), (1087, 1), (417, 276)]


def test_mooncake_jsonl_timestamps_are_milliseconds(tmp_path):
    wl = from_trace(_write(tmp_path, "mc.jsonl", MOONCAKE))
    assert wl.trace_format == "Mooncake / vLLM bench JSONL"
    reqs = wl.sample()
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 2.5, 7.0])
    assert [(r.text_tokens, r.output_tokens) for r in reqs] == [(6955, 52), (6472, 26), (100, 5)]
    assert math.isclose(wl.rate, 2 / 7.0)


def test_plain_csv_still_loads(tmp_path):
    fmt, _, rows, _ = read_trace(_write(tmp_path, "p.csv", "arrival_s,input_tokens,output_tokens\n0,10,2\n"))
    assert fmt == "CSV" and len(rows) == 1


@pytest.mark.parametrize("text, needle", [
    ("when,prompt,answer\n1,2,3\n", "no arrival column"),
    ('{"time": 1, "input_length": 3, "output_length": 4}\n', "no timestamp key"),
    ('{"timestamp": 1, "input_length": "x", "output_length": 4}\n', "is not a number"),
    ('{"timestamp": 1, "input_length": true, "output_length": 4}\n', "must be numbers"),
    ('{"timestamp": 1, "input_length": 3, "output_length": 4}\n[1, 2]\n', ":2: each line must be a JSON object"),
    ('{"timestamp": 1, "input_length": 3\n', ":1: not a JSON object"),
    ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,472\n", "3 fields"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,1e12,3\n", "beyond any model's context"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1e300,1,3\n", "not a usable time"),
])
def test_bad_traces_name_the_line_and_the_expected_columns(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        from_trace(_write(tmp_path, "bad.jsonl" if text.startswith("{") else "bad.csv", text))
    msg = str(e.value)
    assert needle in msg
    if "no " in needle:  # a header of no known format lists every format's columns
        for f in TRACE_FORMATS:
            assert f.name in msg and f.input in msg


def test_requests_beyond_the_context_are_refused_with_the_line(tmp_path, vl_info):
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,10\n1,40000,10\n"
    with pytest.raises(UserError, match=r":3: a request of 40000 input \+ 10 output = 40010 tokens is beyond the "
                                        r"model's context of 32768"):
        from_trace(_write(tmp_path, "long.csv", text), info=vl_info)


# ------------------------------------------------------------------ property tests

_cell = st.one_of(st.integers(-10**15, 10**15).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.text(max_size=8), st.sampled_from(["", "2024-05-10 12:00:00.1234567", "nan", "-0", "1e400"]))
_header = st.sampled_from([
    ["TIMESTAMP", "ContextTokens", "GeneratedTokens"], ["TIMESTAMP", "NumImages", "ContextTokens", "GeneratedTokens"],
    ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"],
    ["arrival", "input_tokens", "output_tokens", "images"], ["a", "b"],
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, rows=st.lists(st.lists(_cell, min_size=0, max_size=7), max_size=6))
def test_any_table_loads_or_gives_a_user_error(tmp_path, vl_info, header, rows):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    p = tmp_path / "h.csv"
    p.write_text(buf.getvalue())
    try:
        wl = from_trace(p, info=vl_info)
    except UserError:
        return
    reqs = wl.sample()
    assert reqs and reqs[0].arrival_s == 0.0
    assert all(r.text_tokens >= 1 and r.output_tokens >= 1 for r in reqs)
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert math.isfinite(wl.rate) and wl.rate > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_any_bytes_load_or_give_a_user_error(tmp_path, data):
    for name in ("x.csv", "x.jsonl"):
        p = tmp_path / name
        p.write_bytes(data)
        try:
            from_trace(p)
        except UserError:
            pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["timestamp", "input_length", "output_length", "hash_ids"]),
                                st.one_of(st.integers(-5, 10**6), st.floats(), st.none(), st.booleans(),
                                          st.text(max_size=4), st.lists(st.integers(), max_size=3))),
                max_size=5))
def test_any_jsonl_loads_or_gives_a_user_error(tmp_path, objs):
    p = tmp_path / "y.jsonl"
    p.write_text("".join(json.dumps(o) + "\n" for o in objs) or "{}\n")
    try:
        wl = from_trace(p)
    except UserError:
        return
    assert all(r.output_tokens >= 1 for r in wl.sample())
