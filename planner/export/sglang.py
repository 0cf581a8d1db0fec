"""SGLang launches (``python -m sglang.launch_server``), flags of server_args.py at commit
001067fffe33.

Mapping: TP / PP / DP -> ``--tp-size`` / ``--pp-size`` / ``--dp-size`` (stage splits through
``SGLANG_PP_LAYER_PARTITION``); a replica spanning nodes -> ``--nnodes`` / ``--node-rank`` /
``--dist-init-addr``; encoder placement -> the TP-sharded encoder (default), ``--mm-enable-dp-encoder``
(encoder replicated, images split over the TP ranks), or encoder disaggregation
(``--encoder-only`` servers, ``--language-only --encoder-urls``); scheduler ->
``--chunked-prefill-size`` / ``--max-prefill-tokens`` / ``--max-running-requests``; FP8 ->
``--quantization fp8`` / ``--kv-cache-dtype fp8_e4m3``.
"""

from __future__ import annotations

from planner.export.common import (DTYPE, Decision, Launch, Layout, Target, dtype_flags, gpu_env, head_addr,
                                   partition)
from plans.schema import Plan

PROGRAM = ["python", "-m", "sglang.launch_server"]
DIST_PORT = "50000"
ENCODER_PORT = 30100  # first encoder server's port; the LLM server keeps SGLang's 30000


def _flags(plan: Plan, t: Target, out: list[Decision]) -> list[str]:
    flags = ["--tp-size", str(t.tp)]
    out.append(Decision("map", f"tp {t.tp} -> --tp-size {t.tp}"))
    if t.pp > 1:
        flags += ["--pp-size", str(t.pp)]
        out.append(Decision("map", f"pp {t.pp} -> --pp-size {t.pp}; stage layers "
                                   f"{', '.join(f'{a}-{b}' for a, b in t.stages)} -> SGLANG_PP_LAYER_PARTITION="
                                   f"{partition(t)}"))
    flags += dtype_flags(t, out, "SGLang", "fp8_e4m3", "",
                         "SGLang keeps a non-FP8 KV cache in the model dtype here: KV {kv} -> {act}", "flag left out")
    flags += ["--chunked-prefill-size", str(t.max_batch_tokens), "--max-prefill-tokens", str(t.max_batch_tokens),
              "--max-running-requests", str(t.max_seqs)]
    out.append(Decision("map", f"scheduler: {t.max_batch_tokens} tokens per step -> --chunked-prefill-size and "
                               f"--max-prefill-tokens, {t.max_seqs} sequences -> --max-running-requests"))
    out.append(Decision("note", f"SGLang pages its KV cache by token (its default page size), not in the plan's "
                                f"{t.block_size}-token blocks; the KV capacity is the same"))
    if plan.model.vision_blocks and t.placement in ("stage0_tp", "stage0_dp"):
        if t.placement == "stage0_dp":
            flags += ["--mm-enable-dp-encoder"]
            out.append(Decision("map", "vision stage0_dp -> --mm-enable-dp-encoder (encoder replicated on the TP "
                                       "ranks, images split across them)"))
        else:
            out.append(Decision("map", "vision stage0_tp -> SGLang's default TP-sharded encoder (no flag)"))
    return flags


def _host(lay: Layout, gpu: int) -> str:
    n = lay.node(gpu)
    return "127.0.0.1" if n == lay.node(lay.replicas[0][0]) else f"${{NODE_ADDR_{n}}}"


def export(plan: Plan, t: Target, lay: Layout, model: str, out: list[Decision]) -> list[Launch]:
    flags = _flags(plan, t, out)
    env = {"SGLANG_PP_LAYER_PARTITION": partition(t)} if t.pp > 1 else {}
    gpn = lay.gpus_per_node
    if lay.encoders:
        urls = [f"http://{_host(lay, g)}:{ENCODER_PORT + i}" for i, g in enumerate(lay.encoders)]
        flags += ["--language-only", "--encoder-urls", *urls]
        out.append(Decision("map", f"vision dedicated ({len(lay.encoders)} GPUs) -> encoder disaggregation: "
                                   f"{len(lay.encoders)} --encoder-only server(s); the LLM server runs --language-only "
                                   "--encoder-urls ..."))
    head = PROGRAM + ["--model-path", model]
    launches: list[Launch] = []
    if lay.replicas_span_nodes:
        for r, _ in enumerate(lay.replicas):
            nodes = lay.replica_nodes(r)
            for j, n in enumerate(nodes):
                dist = ["--nnodes", str(len(nodes)), "--node-rank", str(j),
                        "--dist-init-addr", f"{head_addr(r)}:{DIST_PORT}"]
                launches.append(Launch(n, "llm", list(range(gpn)), dict(env), head + flags + dist))
        out.append(Decision("map", f"each replica spans {len(lay.replica_nodes(0))} nodes -> --nnodes / --node-rank / "
                                   "--dist-init-addr"))
        if t.dp > 1:
            out.append(Decision("note", f"{t.dp} replicas are {t.dp} independent servers (HEAD_ADDR, HEAD_ADDR_1, ...):"
                                        " put a load balancer (SGLang Model Gateway) in front"))
    else:
        per_node: dict[int, list[int]] = {}
        for gpus in lay.replicas:
            per_node.setdefault(lay.node(gpus[0]), []).extend(lay.local(g) for g in gpus)
        for n in sorted(per_node):
            local = per_node[n]
            count = len(local) // t.replica_gpus
            dp = ["--dp-size", str(count)] if count > 1 else []
            launches.append(Launch(n, "llm", local, {**gpu_env(local, gpn), **env}, head + flags + dp))
        if t.dp > 1:
            out.append(Decision("map", f"dp {t.dp} -> --dp-size" + (" per node" if len(per_node) > 1 else f" {t.dp}")))
        if len(per_node) > 1:
            out.append(Decision("note", f"the {len(per_node)} nodes run independent servers: put a load balancer "
                                        "(SGLang Model Gateway) in front"))
    for i, g in enumerate(lay.encoders):
        local = [lay.local(g)]
        enc = head + ["--encoder-only", "--port", str(ENCODER_PORT + i), "--dtype", DTYPE[t.weights_dtype]]
        launches.append(Launch(lay.node(g), "encoder", local, gpu_env(local, gpn), enc))
    launches.sort(key=lambda la: (la.node, la.role != "llm"))
    return launches
