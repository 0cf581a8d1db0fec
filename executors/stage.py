"""One rank's share of one pipeline stage at run time: the sharded model (``executors.model``,
built on meta and cut / sharded by ``executors.parallelize``, then loaded), its KV caches, the
vision tower and the step's image embeddings.

``forward(mb, h_in)`` runs a micro-batch through this stage. Shapes: ``T`` packed tokens;
in SP x TP mode ``T`` is padded to ``T_pad = ceil(T / sp) * sp`` and this rank keeps tokens
``[sp_i * T_pad/sp, (sp_i+1) * T_pad/sp)`` (``parallelize.split_tokens``); the stage ends with an
all-gather over sp so stage outputs are always ``[T, hidden]``. The embedding and lm_head are
vocab-parallel over the stage's P GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from executors import paged_prefill
from executors.attention import (LayerCache, decode_keys, packed_mask, prefill_inputs, sequence_spans, split_decodes,
                                  warm_prompt_plans)
from executors.batch import ImageJob, MicroBatch, to_device
from executors.config import ModelArgs
from executors.encoders import exchange, load_tower
from executors.layers import Linear, load
from executors.model import AttnMeta, Transformer, VocabEmbedding
from executors.parallel import Par, all_to_all, one_shot_groups, symm_all_to_all_groups
from executors.parallelize import UlyssesCore, gather_tokens, parallelize, split_tokens
from executors.weights import WeightSource
from plans.mesh import GRAPH_TOKEN_BUCKETS, kv_heads_per_gpu
from plans.schema import Plan, Stage


def use_one_shot_all_reduce(model: Any, make: Any) -> None:
    """Row-parallel linears and the vocab-parallel embedding all-reduce through the one-shot
    kernel: ``make(groups)`` (``parallel.one_shot_groups``) gives a ``OneShotAllReduce`` per group
    where one works, and each such module's ``group`` becomes it. The LM head's all-gather and
    Ulysses' all-to-all keep their process groups."""
    users = [m for m in model.modules() if isinstance(m, (Linear, VocabEmbedding)) and m.group is not None]
    one_shot = make(list(dict.fromkeys(m.group for m in users)))  # the same order on every rank
    for m in users:
        m.group = one_shot.get(m.group, m.group)


def use_symm_all_to_all(model: Any, a: ModelArgs, sp: int, dtype: torch.dtype, device: torch.device) -> dict[Any, Any]:
    """Ulysses' all-to-alls through ``parallel.SymmAllToAll`` (the LL kernel; ``SHIFTPLAN_A2A_LL=0``: NCCL's)
    where it works: each ``UlyssesCore``'s group becomes one. Returns them by process group. Sized
    for the largest step a CUDA graph holds (``GRAPH_TOKEN_BUCKETS[-1]`` tokens, ``n`` of them a rank):
    a chunk is at most ``n`` rows of either the hidden state (``StageModel.gather_rows``) or a peer's
    share of the packed q, k, v (at most ``(heads + 2 kv_heads) head_dim / sp`` values a row), so
    no graphed step falls back to NCCL's all-to-all, which hangs in a graph."""
    users = [m for m in model.modules() if isinstance(m, UlyssesCore) and m.group is not None]
    symm = symm_all_to_all_groups(list(dict.fromkeys(m.group for m in users)), device,
                                  graphed_chunk_bytes(a, sp, dtype.itemsize))  # the same order on every rank
    for m in users:
        m.group = symm.get(m.group, m.group)
    return symm


def graphed_chunk_bytes(a: ModelArgs, sp: int, itemsize: int) -> int:
    """The largest chunk one sp rank sends a peer in a step a CUDA graph holds (``use_symm_all_to_all``)."""
    rows = -(-GRAPH_TOKEN_BUCKETS[-1] // sp)
    return rows * max(a.hidden, -(-(a.heads + 2 * a.kv_heads) * a.head_dim // sp)) * itemsize


class StageModel:
    """``model``: the stage's ``Transformer`` (built on meta, ``parallelize``d, loaded); ``layers``:
    its decoder layers in order (what ``backends`` compiles); ``caches``: one paged KV cache per
    layer, ``kv_heads_per_gpu`` heads each (shared by both layouts under shift); ``vision``: the
    tower where the plan places it on this stage."""

    def __init__(self, plan: Plan, stage: Stage, a: ModelArgs, par: Par, src: WeightSource,
                 dtype: torch.dtype, kv_dtype: torch.dtype, num_slots: int, fp8: bool = False,
                 all_reduce: str = "auto"):
        """``dtype``: compute dtype (embedding, norms, lm_head, vision tower); ``fp8``: decoder
        linear layers in FP8 (``executors.quant``); ``all_reduce``: ``auto`` sums small row-parallel
        outputs with symmetric memory's one-shot kernel where it works
        (``parallel.OneShotAllReduce``), ``nccl`` always with NCCL."""
        self.plan, self.stage, self.a, self.par, self.dtype = plan, stage, a, par, dtype
        dev = par.device
        with torch.device("meta"):
            model = Transformer(a)
        self.model: Transformer = load(parallelize(model, plan, stage, par), src, dev, dtype, fp8)
        self.layers = list(self.model.layers.values())
        # the sp group's LL all-to-all (SP x TP decode steps can then be captured in CUDA graphs)
        self.sp_a2a = None
        if all_reduce == "auto":
            use_one_shot_all_reduce(self.model, lambda groups: one_shot_groups(groups, dtype, dev))
            self.sp_a2a = use_symm_all_to_all(self.model, a, par.sp, dtype, dev).get(par.sp_group)
        self.vocab_group = par.shift_group if par.P > 1 else None
        self.vision = None
        self.vision_tp = 1  # GPUs the tower is TP-sharded over
        if a.vision is not None and stage.vision:  # Plan.check: the stages ParallelDims.encoder() names
            tp = self._vision_tp(plan, a)
            self.vision, self.vision_tp = load_tower(a.vision, src, dtype, dev, *tp), tp[2]
        self.tower = self.vision  # what encodes: the tower, or its CUDA graphs (``RankRunner``)
        spread = plan.vision.placement in ("stage0_dp", "all_dp")  # images spread over the encoding stages' GPUs
        self.encode_ranks = tuple(r for s in plan.stages if s.vision and spread
                                  for r in par.replica_ranks[s.index * par.P:(s.index + 1) * par.P])
        self.encode_load = [0] * len(self.encode_ranks)  # patches dealt to each of them so far
        self.images_encoded = 0  # requests whose images this rank encoded
        kv_local = kv_heads_per_gpu(a.kv_heads, par.P)
        self.caches = [LayerCache(num_slots, kv_local, a.head_dim, kv_dtype, dev) for _ in self.layers]
        self.replicated_kv = any(getattr(m, "kv_of_q", None) is not None for m in self.model.modules())
        self.image_embeds: dict[int, torch.Tensor] = {}  # request id -> [image tokens, hidden]

    def _vision_tp(self, plan: Plan, a: ModelArgs) -> tuple[Any, int, int]:
        """The tower TP-sharded over the stage's P GPUs where ``ParallelDims.encoder`` says so
        (``stage0_tp``, or ``none``, when its heads and MLP width divide by P), else whole per GPU."""
        g = self.vocab_group
        if g is None or plan.dims().encoder(a.vision.num_heads, a.vision.mlp_dim).tp == 1:
            return None, 0, 1
        return g, dist.get_rank(g), dist.get_world_size(g)

    # ------------------------------------------------------------------ vision
    def receive_images(self, jobs: list[ImageJob]) -> None:
        """Encode (or receive) the step's images where the plan places the encoder, so that every
        stage-0 GPU holds each job's ``[rows, hidden]`` embeddings (see ``executors.encoders``).
        Every rank of the replica calls it at the start of each step."""
        if not jobs or self.a.vision is None:
            return
        par, where = self.par, self.plan.vision.placement
        if where in ("none", "stage0_tp"):  # stage 0's GPUs encode every image together
            if self.model.embed is not None:
                self.image_embeds.update(zip((j.req for j in jobs), self._encode(jobs)))
            return
        m2 = self.a.vision.merge ** 2
        got = exchange(jobs, self.encode_ranks, self.encode_load, par.stage0_ranks, par.rank, self._encode,
                       lambda j: (j.patches // m2, self.a.hidden), self.dtype, par.device)
        self.image_embeds.update(got)

    def _encode(self, jobs: list[ImageJob]) -> list[torch.Tensor]:
        """Every job's ``[rows, hidden]`` embeddings from one tower call over all their images (the
        tower's attention stays within each frame or window, so batching changes no result; one
        call instead of one per request: its launches are paid once a step)."""
        self.images_encoded += len(jobs)
        if not jobs:
            return []
        m2 = self.a.vision.merge ** 2
        dev = self.par.device  # each job's pixels to the device, joined there (not by one CPU thread);
        # page-locked pixels (``requests.join_pixels``) upload without blocking the host
        out = self.tower(torch.cat([j.pixels.to(dev, non_blocking=j.pixels.is_pinned()) for j in jobs]),
                         [g for j in jobs for g in j.grid])
        return list(out.split([j.patches // m2 for j in jobs]))

    def warm_attention(self) -> int:
        """``attention.warm_prompt_plans`` at this stage's attention shapes, one per layout (shift's
        two narrow the heads differently; with replicated KV heads a prompt's keys are gathered to
        one per query head), up to the step budget. The number of SDPA calls made."""
        if not self.layers:
            return 0
        shapes = {(w.attn.nq, w.attn.nq if w.attn.core.kv_of_q is not None else w.attn.nkv, w.attn.head_dim)
                  for w in self.layers[0].layouts.values()}
        return warm_prompt_plans(shapes, self.dtype, self.par.device, self.plan.scheduler.max_batch_tokens)

    def image_rows(self, mb: MicroBatch) -> torch.Tensor:
        """``[N, hidden]``: the embeddings of the micro-batch's image-token rows ``mb.img_tok``, in order."""
        return torch.cat([self.image_embeds[r][s:s + n] for r, s, n in mb.img_src])

    def forget(self, finished: list[int]) -> None:
        """Drop finished requests' image embeddings (preempted ones keep theirs for the recompute)."""
        for r in finished:
            self.image_embeds.pop(r, None)

    # ------------------------------------------------------------------ forward
    def forward(self, mb: MicroBatch, h_in: torch.Tensor | None) -> torch.Tensor:
        """``[T, hidden]`` hidden states (non-last stage) or ``[S, V]`` logits (last stage)."""
        par, dev = self.par, self.par.device
        T = mb.num_tokens
        if self.model.embed is not None:
            x = self.model.embed(to_device(mb.tokens, dev))
            if mb.img_tok.numel():
                x[to_device(mb.img_tok, dev)] = self.image_rows(mb).to(x.dtype)
        else:
            x = h_in
        mode = mb.mode_of(self.stage.index)
        sp = par.sp if (mode == "sp_tp" and par.sp > 1) else 1
        t_pad = -(-T // sp) * sp
        slots = torch.full((t_pad,), -1, dtype=torch.long)
        slots[:T] = mb.slots
        dec = decode_keys(mb, self.scratch_slot, self.block_size) if (t_pad == T and self.caches and dev.type != "cuda") else None
        if mb.decode and (dev.type == "cuda" or t_pad > T):  # decodes read their KV blocks through the table
            meta = self.table_meta(to_device(slots, dev), *self.padded_table(mb, t_pad, dev))
        elif dec is not None:  # one query per sequence: attend over each sequence's own keys
            meta = AttnMeta(slots.to(dev), mb.key_slots.to(dev), None, dec[0].to(dev), dec[1].to(dev))
        elif dev.type == "cuda":  # fused kernels per sequence; no [T, K] mask
            mb = mb.with_keys(self.block_size)
            spans = sequence_spans(mb)
            seqs, decodes = split_decodes(mb, spans, self.block_size, dev)
            kernel = self.paged_prefill_ok and paged_prefill.wanted(len(seqs))
            pre = prefill_inputs(mb, spans, seqs, self.block_size, dev) if kernel else None
            meta = AttnMeta(to_device(slots, dev), to_device(mb.key_slots, dev), None, seqs=seqs, **decodes, prefill=pre)
        else:
            mb = mb.with_keys(self.block_size)
            meta = AttnMeta(slots.to(dev), mb.key_slots.to(dev), packed_mask(mb, t_pad, dev))
        pos = mb.pos
        if sp > 1:
            x, pos = split_tokens(x, pos, par)
        x = self.model.layers_forward(x, to_device(pos, dev), self.caches, meta, mode if par.sp > 1 else "tp")
        if sp > 1:
            x = gather_tokens(x, T, par)
        if self.model.lm_head is None:
            return x
        return self.model.logits(x[to_device(mb.sample_idx, dev)])

    @property
    def paged_prefill_ok(self) -> bool:
        """The paged prefill kernel serves this stage (and has not failed on this process)."""
        return paged_prefill.supported(self.dtype, self.caches[0].k.dtype if self.caches else self.dtype,
                                       self.par.device, self.replicated_kv)

    @property
    def block_size(self) -> int:
        return self.plan.scheduler.block_size

    @property
    def scratch_slot(self) -> int:
        """The cache slot that padding tokens write and padding keys point at (never read as real)."""
        return self.caches[0].k.shape[0] - 1 if self.caches else 0

    def decode_forward(self, tokens: torch.Tensor, h_in: torch.Tensor | None, pos: torch.Tensor,
                       slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, mode: str = "tp") -> torch.Tensor:
        """A decode micro-batch from device tensors alone (what a decode CUDA graph captures):
        ``tokens [B]`` (or ``h_in [B, hidden]`` on later stages), ``pos [B]`` or ``[3, B]``,
        ``slots [B]`` (the slot each new key is written to), ``table [B, nb]`` each sequence's KV
        blocks (padded with block 0), ``lens [B]`` its number of keys; in ``mode`` (``run_layers``).
        Returns ``[B, V]`` logits (last stage) or ``[B, hidden]``."""
        m = self.model
        x = m.embed(tokens) if m.embed is not None else h_in
        x = self.run_layers(x, pos, self.table_meta(slots, table, lens), mode)
        return x if m.lm_head is None else m.logits(x)

    def run_layers(self, x: torch.Tensor, pos: torch.Tensor, meta: AttnMeta, mode: str) -> torch.Tensor:
        """The stage's decoder layers on ``x [T, hidden]`` from device tensors alone: plain TP, or
        ``sp_tp`` (``T`` a multiple of sp): this rank's ``T / sp`` rows through the layers, Ulysses'
        all-to-alls inside, every sp rank's rows gathered after (``gather_rows``)."""
        if mode == "tp":
            return self.model.layers_forward(x, pos, self.caches, meta, "tp")
        x, pos = split_tokens(x, pos, self.par)
        return self.gather_rows(self.model.layers_forward(x, pos, self.caches, meta, "sp_tp"))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every sp rank's rows ``[n, H]`` -> ``[sp n, H]`` in rank order: through the LL all-to-all of
        ``x`` repeated for each peer where Ulysses uses it (``sp_a2a``: capturable in CUDA graphs),
        else NCCL's (or gloo's) all-gather."""
        if self.sp_a2a is None:
            return gather_tokens(x, x.shape[0] * self.par.sp, self.par)
        sp = self.par.sp
        return all_to_all(x[None].expand(sp, *x.shape), self.sp_a2a).reshape(sp * x.shape[0], -1)

    def mixed_forward(self, tokens: torch.Tensor, h_in: torch.Tensor | None, pos: torch.Tensor,
                      slots: torch.Tensor, sample: torch.Tensor, pre: "paged_prefill.PrefillInputs",
                      image: tuple[torch.Tensor, torch.Tensor] | None = None, mode: str = "tp") -> torch.Tensor:
        """A prefill or mixed micro-batch in ``mode`` (``run_layers``) from device tensors alone (what a
        ``graphs.MixedGraphs`` graph captures): ``tokens [T]`` (or ``h_in [T, hidden]`` on later
        stages), ``pos [T]`` or ``[3, T]``, ``slots [T]``, ``sample [S]`` the rows whose logits are
        wanted, ``pre`` every sequence's rows, key count and blocks (the paged prefill kernel attends
        the prefill chunks, the paged decode kernel the decodes: ``paged_prefill.attend``); ``image = (flag [T], rows [T, hidden])``: rows with a
        nonzero flag take their embedding from ``rows`` (image tokens). Returns ``[S, V]`` logits
        (last stage) or ``[T, hidden]``."""
        m = self.model
        x = m.embed(tokens) if m.embed is not None else h_in
        if image is not None and m.embed is not None:
            x = torch.where(image[0][:, None] != 0, image[1].to(x.dtype), x)
        x = self.run_layers(x, pos, AttnMeta(slots, None, None, block_size=self.block_size, prefill=pre), mode)
        return x if m.lm_head is None else m.logits(x[sample])

    @staticmethod
    def padded_table(mb: MicroBatch, t_pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode micro-batch's block table ``[t_pad, nb]`` and key counts ``[t_pad]``: under SP
        the ``t_pad - T`` padding queries (their slot -1: the scratch slot) each read one key, the
        first of block 0, so the step keeps the batched decode path (no per-sequence attention, no
        key list); their rows are dropped by ``gather_tokens``."""
        table, lens = mb.block_table(), torch.tensor(mb.ctx, dtype=torch.long)
        extra = t_pad - mb.num_tokens
        if extra:
            table = F.pad(table, (0, 0, 0, extra))
            lens = F.pad(lens, (0, extra), value=1)
        return to_device(table, dev), to_device(lens, dev)

    def table_meta(self, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> AttnMeta:
        """Decode attention inputs from a block table ``[S, nb]`` and key counts ``lens [S]`` (device
        tensors): key ``p`` of sequence i is real when ``p < lens[i]``."""
        mask = torch.arange(table.shape[1] * self.block_size, device=table.device)[None, :] < lens[:, None]
        return AttnMeta(slots, table, None, seq_mask=mask, table=table, block_size=self.block_size, seq_lens=lens)
