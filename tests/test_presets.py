"""Built-in presets: present, valid HF configs, and the published parameter counts.

The parameter counts here come from the transformers model classes themselves (built on the
meta device from the preset), independent of our tracer, so a wrong value in a preset fails.
"""

from __future__ import annotations

import json

import pytest

from graph.hf_config import PRESET_DIR, load_config, preset_names, text_config

PRESETS = ["llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b",
           "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen2.5-vl-72b"]

# published totals (and vision tower) in parameters
PUBLISHED = {
    "llama-2-70b": (68_976_648_192, 0),
    "llama-3.1-8b": (8_030_261_248, 0),
    "llama-3.1-70b": (70_553_706_496, 0),
    "llama-3.1-405b": (405_853_388_800, 0),
    "qwen2-vl-7b": (8_291_375_616, 675_759_104),
    "qwen2.5-vl-72b": (73_410_777_344, None),
}


def test_all_presets_ship():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        cfg = json.loads((PRESET_DIR / name / "config.json").read_text())
        assert cfg["architectures"] and cfg["model_type"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_valid_and_consistent(name):
    cfg = load_config(preset=name)
    tc = text_config(cfg)
    assert tc["hidden_size"] % tc["num_attention_heads"] == 0
    assert tc["num_attention_heads"] % tc["num_key_value_heads"] == 0
    assert tc["vocab_size"] >= (32_000 if name == "llama-2-70b" else 100_000)
    assert cfg["tie_word_embeddings"] is False
    if name.startswith("llama-3.1"):
        rs = cfg["rope_scaling"]
        assert rs["rope_type"] == "llama3" and rs["factor"] == 8.0
        assert rs["original_max_position_embeddings"] == 8192
        assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 131072
    if "qwen" in name:
        assert cfg["rope_theta"] == 1000000.0
    if name == "llama-2-70b":  # meta-llama/Llama-2-70b-hf config.json: no rope scaling, 4k positions
        assert cfg["rope_scaling"] is None and cfg["rope_theta"] == 10000.0
        assert (cfg["max_position_embeddings"], tc["num_hidden_layers"], tc["num_key_value_heads"]) == (4096, 80, 8)


def test_vision_configs():
    v2 = load_config(preset="qwen2-vl-7b")["vision_config"]
    assert (v2["depth"], v2["embed_dim"], v2["mlp_ratio"], v2["num_heads"]) == (32, 1280, 4, 16)
    assert (v2["patch_size"], v2["spatial_merge_size"], v2["temporal_patch_size"], v2["hidden_size"]) == (14, 2, 2, 3584)
    for name, out in (("qwen2.5-vl-7b", 3584), ("qwen2.5-vl-72b", 8192)):
        cfg = load_config(preset=name)
        v = cfg["vision_config"]
        assert (v["depth"], v["hidden_size"], v["num_heads"], v["window_size"]) == (32, 1280, 16, 112)
        assert v["fullatt_block_indexes"] == [7, 15, 23, 31]
        assert v["out_hidden_size"] == out == cfg["hidden_size"]


@pytest.fixture(scope="module")
def hf_counts():
    """(total, vision) parameter counts of each preset's HF model built on the meta device."""
    import torch
    import transformers

    from graph.families import hf_config

    out = {}
    for name in PRESETS:
        cfg = load_config(preset=name)
        conf = hf_config(cfg)
        cls = getattr(transformers, cfg["architectures"][0])
        with torch.device("meta"):
            model = cls(conf)
        total = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
        out[name] = (total, vision)
    return out


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_model_of_preset_matches_published_count(hf_counts, name):
    total, vision = hf_counts[name]
    want_total, want_vision = PUBLISHED[name]
    assert abs(total - want_total) <= 0.005 * want_total, (total, want_total)
    if want_vision is not None:
        assert abs(vision - want_vision) <= 0.005 * want_vision, (vision, want_vision)


def test_qwen_text_presets_sizes(hf_counts):
    # Qwen2.5 model cards: 7.61B, 32.5B (32.76B with embeddings), 72.7B
    assert abs(hf_counts["qwen2.5-7b"][0] / 7.61e9 - 1) < 0.005
    assert abs(hf_counts["qwen2.5-32b"][0] / 32.76e9 - 1) < 0.005
    assert abs(hf_counts["qwen2.5-72b"][0] / 72.7e9 - 1) < 0.005
    assert hf_counts["qwen2.5-vl-7b"][1] > 0
