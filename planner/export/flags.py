"""Every flag and environment variable ``plan export`` may emit, per engine, with where it is
defined in that engine's source at the pinned version (``planner.export.engines.INFO``).

``tests/test_export.py`` checks that every flag of every exported launch is in this table, so a
new flag cannot be emitted without being looked up first, and that every flag and choice here and every
flag of the committed exports was parsed by the engine's own parser (``bench/export_flags.py``, with
vLLM 0.18.0, Arctic Inference 0.2.0 and SGLang 0.5.10 installed; results in
``bench/results/export_flags.json``).

How the names were checked:

* Arctic Inference v0.2.0: read at the tag (arctic_inference/vllm/args.py ``add_cli_args``,
  arctic_inference/envs.py).
* vLLM v0.18.0: vLLM derives most flags from its config dataclasses (``--`` + field name with
  ``-``; ``EngineArgs.add_cli_args`` in vllm/engine/arg_utils.py). Each name below was read in
  vLLM sources from before and after v0.18.0 (arg_utils.py at 99d7eb5d6a51, config/parallel.py
  at 00193b82b0e2, config/multimodal.py at 01230b40128e, config/ec_transfer.py at 04b022935cd5);
  ``--nnodes / --node-rank / --master-addr`` (multi-node ``mp`` executor) are also used by
  Arctic v0.2.0's own executor patch against v0.18.0 (``parallel_config.nnodes_within_dp``), and
  ``--mm-encoder-only`` by its model runner (``multimodal_config.mm_encoder_only``); its
  benchmark/reproducibility scripts pass ``--tensor-parallel-size``, ``--data-parallel-size``,
  ``--max-num-batched-tokens`` and ``--kv-cache-dtype fp8`` to vLLM v0.18.0 as well. The encoder
  cache connector named in ``--ec-transfer-config`` is ``ECExampleConnector``
  (vllm/distributed/ec_transfer/ec_connector/factory.py; earlier vLLM called it
  ``ECSharedStorageConnector``).
* SGLang: python/sglang/srt/server_args.py at 001067fffe33 (``ServerArgs`` fields, flag =
  ``--`` + field name with ``-``; the encoder-disaggregation flags ``--encoder-only``,
  ``--language-only``, ``--encoder-urls`` are ``ServerArgs`` fields too, and were added by hand in
  ``add_cli_args`` in earlier releases, under the same names).
"""

from __future__ import annotations

_VLLM = {
    # flag: where it is defined
    "--tensor-parallel-size": "ParallelConfig.tensor_parallel_size",
    "--pipeline-parallel-size": "ParallelConfig.pipeline_parallel_size",
    "--data-parallel-size": "ParallelConfig.data_parallel_size",
    "--data-parallel-size-local": "EngineArgs.data_parallel_size_local (arg_utils.py)",
    "--data-parallel-start-rank": "EngineArgs.data_parallel_start_rank (arg_utils.py)",
    "--data-parallel-address": "EngineArgs.data_parallel_address (arg_utils.py)",
    "--data-parallel-rpc-port": "EngineArgs.data_parallel_rpc_port (arg_utils.py)",
    "--headless": "vllm serve (entrypoints/cli/serve.py): no API server on this node",
    "--nnodes": "ParallelConfig.nnodes (multi-node mp executor)",
    "--node-rank": "ParallelConfig.node_rank",
    "--master-addr": "ParallelConfig.master_addr",
    "--max-num-batched-tokens": "SchedulerConfig.max_num_batched_tokens",
    "--max-num-seqs": "SchedulerConfig.max_num_seqs",
    "--block-size": "CacheConfig.block_size",
    "--kv-cache-dtype": "CacheConfig.cache_dtype (auto | fp8 | fp8_e4m3 | fp8_e5m2 ...)",
    "--quantization": "ModelConfig.quantization",
    "--dtype": "ModelConfig.dtype (auto | bfloat16 | float16 | float32 ...)",
    "--mm-encoder-tp-mode": "MultiModalConfig.mm_encoder_tp_mode (weights | data)",
    "--mm-encoder-only": "MultiModalConfig.mm_encoder_only (disaggregated encoder process)",
    "--ec-transfer-config": "VllmConfig.ec_transfer_config (ECTransferConfig: ec_connector, ec_role, ...)",
    "--port": "vllm serve (OpenAI server frontend args)",
}
_VLLM_ENV = {
    "VLLM_PP_LAYER_PARTITION": "vllm/envs.py: layers per pipeline stage, comma-separated",
    "CUDA_VISIBLE_DEVICES": "CUDA runtime: the node's GPUs this process uses",
}

_ARCTIC = dict(_VLLM)
_ARCTIC.update({
    "--ulysses-sequence-parallel-size": "arctic_inference/vllm/args.py ArcticArgs.ulysses_sequence_parallel_size",
    "--enable-shift-parallel": "arctic_inference/vllm/args.py ArcticArgs.enable_shift_parallel",
    "--shift-parallel-threshold": "arctic_inference/vllm/args.py ArcticArgs.shift_parallel_threshold "
                                  "(default 512; TP when a step's scheduled tokens <= threshold)",
})
_ARCTIC_ENV = dict(_VLLM_ENV)
_ARCTIC_ENV["ARCTIC_INFERENCE_ENABLED"] = "arctic_inference/envs.py: loads the plugin into vLLM when 1"

_SGLANG = {
    "--model-path": "ServerArgs.model_path",
    "--tp-size": "ServerArgs.tp_size",
    "--pp-size": "ServerArgs.pp_size",
    "--dp-size": "ServerArgs.dp_size",
    "--nnodes": "ServerArgs.nnodes",
    "--node-rank": "ServerArgs.node_rank",
    "--dist-init-addr": "ServerArgs.dist_init_addr",
    "--chunked-prefill-size": "ServerArgs.chunked_prefill_size",
    "--max-prefill-tokens": "ServerArgs.max_prefill_tokens",
    "--max-running-requests": "ServerArgs.max_running_requests",
    "--kv-cache-dtype": "ServerArgs.kv_cache_dtype (auto | fp8_e4m3 | fp8_e5m2 | bf16 ...)",
    "--quantization": "ServerArgs.quantization",
    "--dtype": "ServerArgs.dtype",
    "--mm-enable-dp-encoder": "ServerArgs.mm_enable_dp_encoder (encoder data parallel over the TP ranks)",
    "--encoder-only": "ServerArgs.encoder_only: an encoder-only server (encoder disaggregation)",
    "--language-only": "ServerArgs.language_only: the language model only, images encoded by --encoder-urls",
    "--encoder-urls": "ServerArgs.encoder_urls: the encoder-only servers a --language-only server uses",
    "--port": "ServerArgs.port",
}
_SGLANG_ENV = {
    "SGLANG_PP_LAYER_PARTITION": "srt/distributed/utils.py get_pp_indices: layers per pipeline stage",
    "CUDA_VISIBLE_DEVICES": "CUDA runtime: the node's GPUs this process uses",
}

FLAGS: dict[str, dict[str, str]] = {"vllm": _VLLM, "arctic": _ARCTIC, "sglang": _SGLANG}
ENV: dict[str, dict[str, str]] = {"vllm": _VLLM_ENV, "arctic": _ARCTIC_ENV, "sglang": _SGLANG_ENV}

# Values the exports pass to flags that take a fixed set (a subset of each engine's choices, as read).
_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {"--dtype": _DTYPES, "--kv-cache-dtype": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
             "--mm-encoder-tp-mode": ("weights", "data"), "--quantization": ("fp8",),
             "--block-size": ("1", "8", "16", "32", "64", "128")},
    "sglang": {"--dtype": _DTYPES, "--kv-cache-dtype": ("auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16"),
               "--quantization": ("fp8",)},
}
CHOICES["arctic"] = CHOICES["vllm"]
