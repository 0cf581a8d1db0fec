"""`plan graph` and the on-disk graph cache."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from graph import cache as graph_cache
from graph import trace as graph_trace
from graph.serialize import from_dict, to_dict
from planner.cli import main

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
        "vocab_size": 1000, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# embed 256k + 3 layers * (q 65536 + k,v 2*32768 + o 65536 + mlp 3*131072 + norms 512) + norm 256 + lm_head 256k
TINY_PARAMS = 256_000 + 3 * (65_536 + 2 * 32_768 + 65_536 + 3 * 131_072 + 512) + 256 + 256_000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A spec pointing at a tiny config by a relative path, and a cache dir shared by the module."""
    d = tmp_path_factory.mktemp("graphcli")
    (d / "models" / "tiny").mkdir(parents=True)
    (d / "models" / "tiny" / "config.json").write_text(json.dumps(TINY))
    (d / "spec.yaml").write_text("name: tiny-on-h100\nmodel:\n  config: models/tiny\n"
                                 "hardware: {gpu: h100, gpus_per_node: 1, nodes: 1}\nworkload: {arrival_rate: 2.0}\n")
    (d / "cache").mkdir()
    return d


@pytest.fixture(autouse=True)
def _cache_env(workdir, monkeypatch):
    monkeypatch.setenv("SHIFTPLAN_CACHE", str(workdir / "cache"))


def _run_json(capsys, *argv: str) -> dict:
    assert main(["graph", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_graph_json_then_cached(workdir, capsys):
    first = _run_json(capsys, str(workdir / "spec.yaml"), "--no-cache")
    assert first["name"] == "tiny-on-h100" and first["cached"] is False
    assert isinstance(first["total_params"], int) and first["total_params"] == TINY_PARAMS
    assert [b["name"] for b in first["blocks"]] == ["embed", "layers.0", "layers.1", "layers.2", "norm", "lm_head"]
    assert all(set(b) >= {"name", "kind", "params"} for b in first["blocks"])
    assert sum(b["params"] for b in first["blocks"]) == TINY_PARAMS
    assert first["trace_seconds"] > 0
    _run_json(capsys, str(workdir / "spec.yaml"))  # stores the entry
    again = _run_json(capsys, str(workdir / "spec.yaml"))
    assert again["cached"] is True and again["total_params"] == TINY_PARAMS
    assert again["config_sha256"] == first["config_sha256"]


def test_cached_graph_does_not_import_torch_or_transformers(workdir, capsys):
    _run_json(capsys, str(workdir / "spec.yaml"))  # make sure it is cached
    code = ("import json, sys\nfrom planner.cli import main\n"
            f"rc = main(['graph', {str(workdir / 'spec.yaml')!r}, '--json'])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
            "'transformers': 'transformers' in sys.modules}), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "SHIFTPLAN_CACHE": str(workdir / "cache")})
    status = json.loads(p.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False, "transformers": False}, p.stderr
    assert json.loads(p.stdout)["cached"] is True


def test_table_output(workdir, capsys):
    assert main(["graph", str(workdir / "spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert "decoder" in out and "lm_head" in out and f"{TINY_PARAMS:,}" in out


def test_block_ops_listing(workdir, capsys):
    d = _run_json(capsys, str(workdir / "spec.yaml"), "--block", "layers.1")
    ops = {o["name"]: o for o in d["block_ops"]}
    q = ops["layers.1.self_attn.q_proj"]
    assert (q["kind"], q["shard"], q["params"], q["flops_per_token"]) == ("matmul", "column", 65_536, 2 * 256 * 256)
    attn = ops["layers.1.self_attn.attn"]
    assert attn["flops_per_pair"] == 4 * 4 * 64 and attn["kv_read_per_kv_token"] == 2 * 2 * 64
    assert ops["layers.1.input_layernorm"]["preds"] == ["layers.0.residual2"]
    assert sum(o["params"] for o in ops.values()) == next(b["params"] for b in d["blocks"] if b["name"] == "layers.1")
    assert main(["graph", str(workdir / "spec.yaml"), "--block", "layers.1"]) == 0
    assert "layers.1.mlp.down_proj" in capsys.readouterr().out
    assert main(["graph", str(workdir / "spec.yaml"), "--block", "layers.7"]) == 2
    assert "no block 'layers.7'" in capsys.readouterr().err


def test_config_directory_and_file_work(workdir, capsys):
    by_dir = _run_json(capsys, str(workdir / "models" / "tiny"))
    by_file = _run_json(capsys, str(workdir / "models" / "tiny" / "config.json"))
    assert by_dir["total_params"] == by_file["total_params"] == TINY_PARAMS


def test_cache_key_follows_content(workdir):
    a = graph_cache.cache_path(TINY)
    b = graph_cache.cache_path(dict(TINY, num_hidden_layers=4))
    assert a != b and a.parent == Path(workdir / "cache")
    assert a.name.endswith(f"-t{graph_trace.TRACER_VERSION}.json")


def test_corrupt_cache_entry_is_retraced(workdir):
    cfg = dict(TINY, num_hidden_layers=1)
    path = graph_cache.cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    r = graph_cache.load_or_trace(cfg)
    assert r.cached is False and r.graph.info.layers == 1
    r2 = graph_cache.load_or_trace(cfg)
    assert r2.cached is True and r2.graph.total_params == r.graph.total_params


def test_serialization_round_trip(workdir):
    g = graph_cache.get_graph(TINY)
    back = from_dict(json.loads(json.dumps(to_dict(g, 1))))
    assert list(back.graph.nodes) == list(g.graph.nodes)
    assert sorted(back.graph.edges) == sorted(g.graph.edges)
    assert [asdict(b) for b in back.blocks] == [asdict(b) for b in g.blocks]
    assert all(asdict(back.op(n)) == asdict(g.op(n)) for n in g.graph.nodes)
    assert back.info == g.info and back.config_sha256 == g.config_sha256


@pytest.mark.parametrize("argv,needle", [
    (["llama-3.1-9b"], "did you mean 'llama-3.1-8b'"),
    (["missing.yaml"], "file not found"),
])
def test_user_errors_exit_2_without_traceback(argv, needle, capsys):
    assert main(["graph", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unsupported_and_broken_configs(tmp_path, capsys):
    (tmp_path / "gpt2.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["graph", str(tmp_path / "gpt2.json")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "Qwen2_5_VLForConditionalGeneration" in err
    (tmp_path / "bad.json").write_text("{\"architectures\": [")
    assert main(["graph", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "spec.yaml").write_text("name: x\nmodel: {config: nowhere/config.json}\n"
                                        "hardware: {gpu: h100, gpus_per_node: 1, nodes: 1}\n"
                                        "workload: {arrival_rate: 1.0}\n")
    assert main(["graph", str(tmp_path / "spec.yaml")]) == 2
    assert "model config not found" in capsys.readouterr().err
