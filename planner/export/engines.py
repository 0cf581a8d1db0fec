"""What each serving engine can run, at the version ``plan export`` targets.

Pure arithmetic on mesh degrees, encoder placements and model architecture names, so the
planner (spec field ``engine``: the search keeps only meshes the engine runs) and the export
(``plan export``: a plan the engine cannot run is refused or downgraded) apply the same rules.
Each rule's message names the engine's limit and where in the engine's source it comes from.

Versions (read from each engine's own source; see ``planner.export.flags`` for every flag):

* vLLM v0.18.0 -- the release Arctic Inference v0.2.0 requires (its pyproject pins
  ``vllm==0.18.0``), so one vLLM serves both exports.
* Arctic Inference v0.2.0 (tag commit e9bbbd085b204392ab975cfcbcc283d3ca5e8fea), a vLLM plugin
  enabled with ``ARCTIC_INFERENCE_ENABLED=1``.
* SGLang at commit 001067fffe33427bee0ed2f007fb7551a1d76b44 (python/sglang/srt/server_args.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from plans.mesh import ENCODER_PLACEMENTS

ENGINES = ("vllm", "arctic", "sglang")


@dataclass(frozen=True)
class EngineInfo:
    name: str  # as the user writes it: vllm | arctic | sglang
    title: str  # as people say it
    version: str  # what the export targets
    source: str  # where the flag names were read


INFO = {
    "vllm": EngineInfo("vllm", "vLLM", "v0.18.0",
                       "github.com/vllm-project/vllm vllm/engine/arg_utils.py, vllm/config/{parallel,scheduler,cache,"
                       "multimodal,ec_transfer}.py, vllm/envs.py"),
    "arctic": EngineInfo("arctic", "Arctic Inference", "v0.2.0 (on vLLM v0.18.0)",
                         "github.com/snowflakedb/ArcticInference@v0.2.0 arctic_inference/vllm/args.py, "
                         "arctic_inference/envs.py; vLLM v0.18.0 as for the vllm export"),
    "sglang": EngineInfo("sglang", "SGLang", "commit 001067fffe33",
                         "github.com/sgl-project/sglang@001067fffe33427bee0ed2f007fb7551a1d76b44 "
                         "python/sglang/srt/server_args.py"),
}

# Qwen-VL models take 3-row (temporal, height, width) M-RoPE positions of shape [3, tokens].
MROPE_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

# Encoder placements each engine runs (vision models). vLLM and SGLang run the encoder on the
# first pipeline stage only, so no engine runs ``all_dp`` (the encoder on every stage's GPUs).
PLACEMENTS = {
    "shiftplan": ENCODER_PLACEMENTS,
    "vllm": ("stage0_tp", "stage0_dp", "dedicated"),  # --mm-encoder-tp-mode weights | data; EPD
    "arctic": ("stage0_tp", "stage0_dp", "dedicated"),  # vLLM's, unchanged by the plugin
    "sglang": ("stage0_tp", "stage0_dp", "dedicated"),  # TP encoder; --mm-enable-dp-encoder; EPD
}


def no_sp(engine: str) -> str:
    title = f"{INFO[engine].title} {INFO[engine].version}"
    if engine == "vllm":
        return (f"{title} has no Ulysses sequence parallelism (its ParallelConfig has tensor, pipeline, data and "
                "context-parallel sizes, no SP degree; use --engine arctic for SP and shift)")
    return (f"{title} has no Ulysses sequence parallelism for the decoder (server_args.py has tp/pp/dp sizes and "
            "context parallelism for DeepSeek-style attention only)")


def mesh_limit(engine: str, pp: int, tp: int, sp: int, architecture: str = "", max_seqs: int | None = None
               ) -> str | None:
    """None when ``engine`` runs a (pp, tp, sp) replica of this model, else the limit it hits."""
    hit = limit_of(engine, pp, tp, sp, architecture, max_seqs)
    return hit[1] if hit else None


def limit_of(engine: str, pp: int, tp: int, sp: int, architecture: str = "", max_seqs: int | None = None
             ) -> tuple[str, str] | None:
    """The first limit hit as (what it limits: "sp" or "max_seqs", the message), or None."""
    if engine == "shiftplan" or sp == 1:
        return None
    if engine in ("vllm", "sglang"):
        return "sp", no_sp(engine)
    # Arctic Inference v0.2.0
    if pp > 1:
        return "sp", ("Arctic Inference v0.2.0 runs Ulysses SP without pipeline stages: its forward patch "
                      "(model_runner.py monkeypatch_forward) slices input_ids / inputs_embeds and positions over the "
                      "SP ranks, and a later stage's intermediate tensors are not sliced")
    if architecture in MROPE_ARCHITECTURES:
        return "sp", ("Arctic Inference v0.2.0 slices `positions` along its first axis over the SP ranks "
                      "(model_runner.py monkeypatch_forward); Qwen-VL's M-RoPE positions are [3, tokens], so SP "
                      "would split the three rope rows instead of the tokens")
    if max_seqs is not None and max_seqs % sp:
        return "max_seqs", ("Arctic Inference v0.2.0 pads each step's tokens to a multiple of the SP degree and "
                            "scales its CUDA-graph batch sizes by it (ulysses.py), and has failed on a batch size "
                            "that is not a multiple: keep --max-num-seqs divisible by the SP degree: "
                            f"{max_seqs} % {sp} = {max_seqs % sp}")
    return None


def placement_limit(engine: str, placement: str) -> str | None:
    """None when ``engine`` runs the encoder where ``placement`` puts it, else the limit."""
    if placement in ("none",) or placement in PLACEMENTS.get(engine, PLACEMENTS["shiftplan"]):
        return None
    title = f"{INFO[engine].title} {INFO[engine].version}"
    return (f"{title} runs the vision encoder on the first pipeline stage only (not on every stage's GPUs, "
            "placement all_dp)")
