"""Build test plans directly from the schema, save tiny HF checkpoints, run the HF oracle, run Triton
kernels through the interpreter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from plans.build import assemble_plan
from plans.mesh import ParallelDims, even_layers
from plans.schema import Hardware, MemoryPerGPU, ModelRef, Plan, Provenance, Scheduler

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CONFIGS = {n: HERE / f"{n}.json" for n in ("llama", "llama_bias", "qwen2", "qwen2_vl", "qwen2_5_vl", "mistral")}
IMAGE_TOKEN = 120


def config(name: str) -> dict[str, Any]:
    return json.loads(CONFIGS[name].read_text())


def make_plan(name: str, dp: int = 1, pp: int = 1, tp: int = 1, sp: int = 1, shift: bool = False,
              threshold: int | None = None, microbatches: int = 1, block_size: int = 4,
              max_batch_tokens: int = 64, max_seqs: int = 8, placement: str | None = None,
              dtype: str = "fp32", backend: str = "eager", dedicated: int = 0) -> Plan:
    """A plan for a tiny config and a pinned mesh (layers split evenly over pp stages);
    ``dedicated`` encoder GPUs with ``placement="dedicated"``."""
    cfg = config(name)
    layers = cfg["num_hidden_layers"]
    depth = cfg.get("vision_config", {}).get("depth", 0)
    if placement is None:
        placement = "stage0_dp" if depth else "none"
    size = dp * pp * tp * sp + dedicated
    dims = ParallelDims(dp=dp, pp=pp, tp=tp, sp=sp, gpus_per_node=size, nodes=1, placement=placement,
                        dedicated_gpus=dedicated, vision=depth > 0, shift=shift, threshold=threshold if shift else None)
    return assemble_plan(
        name=f"tiny-{name}-{dims.label()}{'-shift' if shift else ''}",
        provenance=Provenance(spec_sha256="0" * 64, model_config_sha256="0" * 64, cost_profile="none",
                              shiftplan_version="test"),
        model=ModelRef(name=name, config=str(CONFIGS[name]), architecture=cfg["architectures"][0],
                       weights_dtype=dtype, kv_dtype=dtype, num_layers=layers, vision_blocks=depth),
        hardware=Hardware(gpu="cpu", gpus_per_node=size, nodes=1), objective="max_throughput", dims=dims,
        layers=even_layers(layers, pp),
        memory=MemoryPerGPU(weights=0.0, kv=0.0, activations=0.0, total=0.0, capacity=1.0, kv_tokens=4096),
        scheduler=Scheduler(max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, block_size=block_size,
                            microbatches=microbatches),
        backend=backend,
    )


def hf_model(name: str, seed: int = 0) -> Any:
    """The HF transformers model of a tiny config with seeded weights (fp32, eval mode)."""
    import transformers

    from executors.config import hf_config_object

    cfg = hf_config_object(config(name))
    cls = getattr(transformers, config(name)["architectures"][0])
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger than HF's 0.02 init so greedy tokens have clear winners
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in**0.5 if "embed" not in n else 1.0)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save_checkpoint(name: str, out: Path, seed: int = 0) -> Any:
    """Write the tiny model as an HF safetensors checkpoint; return the model (the oracle)."""
    model = hf_model(name, seed)
    model.save_pretrained(str(out))
    return model


def oracle_logits(model: Any, tokens: list[int], images: list[Any] | None = None) -> torch.Tensor:
    """HF logits ``[L, V]`` of one full sequence (prompt + generated) in one forward pass."""
    ids = torch.tensor([tokens])
    if not images:
        with torch.no_grad():
            return model(input_ids=ids).logits[0].float()
    # image features scattered at the prompt's image tokens only (a generated token may equal the
    # image-pad id); M-RoPE positions from HF's own get_rope_index
    n_img = sum(im.grid[0] * im.grid[1] * im.grid[2] // 4 for im in images)
    mm = torch.zeros_like(ids)
    pos_img = [i for i, t in enumerate(tokens) if t == IMAGE_TOKEN][:n_img]
    mm[0, pos_img] = 1
    grid = torch.tensor([list(im.grid) for im in images])
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(torch.cat([im.pixels for im in images]), grid).pooler_output
        emb[0, pos_img] = torch.cat(list(feats)).to(emb.dtype)
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
        return model(inputs_embeds=emb, position_ids=pos).logits[0].float()


def random_image(grid_hw: tuple[int, int], seed: int) -> Any:
    """A random preprocessed image with a (1, h, w) patch grid (h, w even)."""
    from executors.images import ImageInput

    g = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    return ImageInput(torch.randn(h * w, 3 * 2 * 14 * 14, generator=g), (1, h, w))


def check_against_oracle(model: Any, prompt: list[int], result: Any, images: list[Any] | None = None) -> float:
    """Max relative logit error of an engine result vs HF (teacher forced on the engine's tokens);
    asserts that every generated token is HF's greedy choice. Returns the relative error."""
    full = list(result.prompt_tokens) + list(result.tokens)
    ref = oracle_logits(model, full[:-1], images)
    L = len(result.prompt_tokens)
    want = ref[L - 1:]
    got = result.logits
    assert got.shape == want.shape, (got.shape, want.shape)
    greedy = want.argmax(-1).tolist()
    assert greedy == list(result.tokens), f"tokens differ from HF greedy: {result.tokens} vs {greedy}"
    return float((got - want).abs().max() / want.abs().max())


def save_tokenizer(out: Path) -> None:
    """A word-level tokenizer for the tiny vocab: 'w0' .. 'w127' are token ids 0 .. 127."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(str(out))


def run_interpreted(*args: str, timeout: float = 600) -> str:
    """``python ARGS`` from the repository root in a fresh process with ``TRITON_INTERPRET=1`` (Triton
    kernels run on CPU tensors; the variable must be set before triton is imported); fails the test
    with the process's stderr unless it exits 0, and returns its stdout."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def sp2_runner(rank: int, port: int) -> Any:
    """Rank ``rank`` of two gloo ranks joined at ``port``: a ``RankRunner`` of the tiny Llama on an sp2
    plan (fp32, seeded random weights, eager layers, no graphs)."""
    import torch.distributed as dist

    from executors.config import model_args
    from executors.parallel import build_par
    from executors.worker import RankRunner, WorkerSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    plan = make_plan("llama", sp=2, max_batch_tokens=64, max_seqs=8)
    return RankRunner(WorkerSpec(plan.model_dump_json(), model_args(config("llama")).portable(), None, 0, "cpu", 64,
                                 "eager", False), build_par(plan.mesh, rank, torch.device("cpu")))
