"""vLLM v0.18.0 launches (``vllm serve``); the Arctic Inference export adds its flags to these.

Mapping: TP / PP degrees -> ``--tensor-parallel-size`` / ``--pipeline-parallel-size`` (stage
splits through ``VLLM_PP_LAYER_PARTITION``); DP replicas inside a node -> ``--data-parallel-size``
(``--data-parallel-size-local`` / ``--data-parallel-start-rank`` / ``--headless`` over nodes);
a replica spanning nodes -> ``--nnodes`` / ``--node-rank`` / ``--master-addr``; encoder
placement -> ``--mm-encoder-tp-mode weights | data``, or encoder disaggregation (``--mm-encoder-only``
servers and ``--ec-transfer-config``); scheduler -> ``--max-num-batched-tokens`` / ``--max-num-seqs``
/ ``--block-size``; FP8 -> ``--quantization fp8`` / ``--kv-cache-dtype fp8``.
"""

from __future__ import annotations

import json

from planner.export.common import (DTYPE, Decision, Launch, Layout, Target, dtype_flags, gpu_env, head_addr,
                                   partition)
from plans.schema import Plan

DP_RPC_PORT = "13345"
ENCODER_PORT = 8100  # first encoder server's port; the LLM server keeps vLLM's 8000


def ec_config(role: str) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": "ec_cache"}}, separators=(",", ":"))


def common_flags(plan: Plan, t: Target, out: list[Decision]) -> list[str]:
    """Model dtype, quantization, KV dtype and scheduler flags (every LLM server)."""
    flags = dtype_flags(t, out, "vLLM", "fp8", " (an FP8 checkpoint is read as is; a bf16 one is quantized at load)",
                        "vLLM keeps a non-FP8 KV cache in the model dtype (--kv-cache-dtype auto): KV {kv} -> {act}",
                        "the model dtype; flag left out")
    flags += ["--max-num-batched-tokens", str(t.max_batch_tokens), "--max-num-seqs", str(t.max_seqs),
              "--block-size", str(t.block_size)]
    out.append(Decision("map", f"scheduler: {t.max_batch_tokens} tokens per step -> --max-num-batched-tokens, "
                               f"{t.max_seqs} sequences -> --max-num-seqs, KV block {t.block_size} -> --block-size"))
    return flags


def parallel_flags(t: Target, out: list[Decision]) -> list[str]:
    flags = ["--tensor-parallel-size", str(t.tp)]
    out.append(Decision("map", f"tp {t.tp} -> --tensor-parallel-size {t.tp}"))
    if t.pp > 1:
        flags += ["--pipeline-parallel-size", str(t.pp)]
        out.append(Decision("map", f"pp {t.pp} -> --pipeline-parallel-size {t.pp}; stage layers "
                                   f"{', '.join(f'{a}-{b}' for a, b in t.stages)} -> VLLM_PP_LAYER_PARTITION="
                                   f"{partition(t)}"))
    return flags


def vision_flags(plan: Plan, t: Target, out: list[Decision]) -> list[str]:
    if not plan.model.vision_blocks or t.placement == "none":
        return []
    if t.placement == "dedicated":
        out.append(Decision("map", f"vision dedicated ({t.dedicated_gpus} GPUs) -> encoder disaggregation: "
                                   f"{t.dedicated_gpus} --mm-encoder-only server(s) producing the encoder cache, the "
                                   "LLM server consuming it (--ec-transfer-config)"))
        out.append(Decision("note", "encoder disaggregation: send each request through vLLM's disaggregated-encoder "
                                    "proxy (encoder first, then the LLM server); ECExampleConnector shares the encoder "
                                    "cache through the directory ec_cache, which both sides must see"))
        return ["--ec-transfer-config", ec_config("ec_consumer")]
    mode = "weights" if t.placement == "stage0_tp" else "data"
    out.append(Decision("map", f"vision {t.placement} -> --mm-encoder-tp-mode {mode} (vLLM runs the encoder on the "
                               "first pipeline stage)"))
    return ["--mm-encoder-tp-mode", mode]


def build(plan: Plan, t: Target, lay: Layout, model: str, out: list[Decision], extra: list[str],
          base_env: dict[str, str], program: list[str]) -> list[Launch]:
    """The launches; ``extra`` / ``base_env`` / ``program`` let Arctic reuse them."""
    flags = parallel_flags(t, out) + extra + common_flags(plan, t, out) + vision_flags(plan, t, out)
    env = dict(base_env)
    if t.pp > 1:
        env["VLLM_PP_LAYER_PARTITION"] = partition(t)
    gpn = lay.gpus_per_node
    launches: list[Launch] = []
    if lay.replicas_span_nodes:
        for r, gpus in enumerate(lay.replicas):
            nodes = lay.replica_nodes(r)
            for j, n in enumerate(nodes):
                dist = ["--nnodes", str(len(nodes)), "--node-rank", str(j), "--master-addr", head_addr(r)]
                launches.append(Launch(n, "llm", list(range(gpn)), dict(env),
                                       program + [model] + flags + dist + (["--headless"] if j else [])))
        out.append(Decision("map", f"each replica spans {len(lay.replica_nodes(0))} nodes -> --nnodes / --node-rank / "
                                   "--master-addr (multi-node mp executor), --headless on all but its first node"))
        if t.dp > 1:
            out.append(Decision("note", f"{t.dp} replicas are {t.dp} independent servers (HEAD_ADDR, HEAD_ADDR_1, ...):"
                                        " put a load balancer in front"))
    else:
        per_node: dict[int, list[int]] = {}
        for gpus in lay.replicas:
            per_node.setdefault(lay.node(gpus[0]), []).extend(lay.local(g) for g in gpus)
        nodes = sorted(per_node)
        start = 0
        for j, n in enumerate(nodes):
            local = per_node[n]
            count = len(local) // t.replica_gpus
            dp = []
            if len(nodes) > 1:
                dp = ["--data-parallel-size", str(t.dp), "--data-parallel-size-local", str(count),
                      "--data-parallel-address", head_addr(), "--data-parallel-rpc-port", DP_RPC_PORT]
                if j:
                    dp += ["--headless", "--data-parallel-start-rank", str(start)]
            elif t.dp > 1:
                dp = ["--data-parallel-size", str(t.dp)]
            start += count
            launches.append(Launch(n, "llm", local, {**gpu_env(local, gpn), **env}, program + [model] + flags + dp))
        if t.dp > 1:
            out.append(Decision("map", f"dp {t.dp} -> --data-parallel-size {t.dp}"
                                       + (" (--data-parallel-size-local per node, --headless on nodes after the first)"
                                          if len(nodes) > 1 else "")))
    for i, g in enumerate(lay.encoders):
        local = [lay.local(g)]
        enc = program + [model, "--mm-encoder-only", "--ec-transfer-config", ec_config("ec_producer"),
                         "--port", str(ENCODER_PORT + i), "--dtype", DTYPE[t.weights_dtype]]
        launches.append(Launch(lay.node(g), "encoder", local, {**gpu_env(local, gpn), **base_env}, enc))
    launches.sort(key=lambda la: (la.node, la.role != "llm"))
    return launches


def export(plan: Plan, t: Target, lay: Layout, model: str, out: list[Decision]) -> list[Launch]:
    return build(plan, t, lay, model, out, [], {}, ["vllm", "serve"])
