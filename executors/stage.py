"""One rank's share of one pipeline stage: embedding, vision tower, decoder layers, lm_head.

``forward(mb, h_in)`` runs a micro-batch through this stage. Shapes: ``T`` packed tokens;
in SP x TP mode ``T`` is padded to ``T_pad = ceil(T / sp) * sp`` and this rank keeps tokens
``[sp_i * T_pad/sp, (sp_i+1) * T_pad/sp)`` (rotary positions, 1-D or M-RoPE's ``[3, T]``, are sliced
on the token axis); the stage ends with an all-gather over sp so stage outputs are always
``[T, hidden]``. The embedding and lm_head are vocab-parallel over the stage's P GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from executors.attention import LayerCache, decode_keys, packed_mask, sequence_spans
from executors.batch import ImageJob, MicroBatch
from executors.config import ModelArgs
from executors.dense import AttnMeta, DecoderLayer, rms_norm
from executors.encoders import exchange
from executors.parallel import Par, all_gather_cat, all_reduce
from executors.rope import cos_sin, inv_freq
from executors.vision import VisionTower, vision_shapes
from executors.weights import WeightSource
from plans.mesh import kv_heads_per_gpu
from plans.schema import Plan, Stage


def checkpoint_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of the whole model (what seeded random weights generate)."""
    H, D, I = a.hidden, a.head_dim, a.intermediate
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab, H), "model.norm.weight": (H,)}
    if not a.tie_embeddings:
        s["lm_head.weight"] = (a.vocab, H)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_proj.weight": (a.heads * D, H), p + "self_attn.k_proj.weight": (a.kv_heads * D, H),
                  p + "self_attn.v_proj.weight": (a.kv_heads * D, H), p + "self_attn.o_proj.weight": (H, a.heads * D),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
        if a.qkv_bias:
            s.update({p + "self_attn.q_proj.bias": (a.heads * D,), p + "self_attn.k_proj.bias": (a.kv_heads * D,),
                      p + "self_attn.v_proj.bias": (a.kv_heads * D,)})
    if a.vision is not None:
        s.update(vision_shapes(a.vision))
    return s


def _vocab_rows(src: WeightSource, name: str, vocab: int, group: Any) -> tuple[torch.Tensor, int]:
    """This rank's vocab shard ``[V/P, hidden]`` and its first row (the whole table if V % P != 0)."""
    n = dist.get_world_size(group) if group is not None else 1
    if n == 1 or vocab % n:
        return src.rows(name), 0
    i = dist.get_rank(group)
    k = vocab // n
    return src.rows(name, [(i * k, (i + 1) * k)]), i * k


class StageModel:
    def __init__(self, plan: Plan, stage: Stage, a: ModelArgs, par: Par, src: WeightSource,
                 dtype: torch.dtype, kv_dtype: torch.dtype, num_slots: int, fp8: bool = False):
        """``dtype``: compute dtype (embedding, norms, lm_head, vision tower); ``fp8``: decoder
        linear layers in FP8 (``executors.quant``)."""
        self.plan, self.stage, self.a, self.par, self.dtype = plan, stage, a, par, dtype
        dev = par.device
        shift = plan.shift.enabled and par.sp > 1
        self.vocab_group = par.shift_group if par.P > 1 else None
        self.embed = self.lm_head = self.norm = self.vision = None
        if stage.embedding:
            w, self.embed_lo = _vocab_rows(src, "model.embed_tokens.weight", a.vocab, self.vocab_group)
            self.embed = w.to(dev, dtype)
        if a.vision is not None and stage.vision:  # Plan.check: the stages ParallelDims.encoder() names
            self.vision = VisionTower(a.vision, src, dtype, dev, *self._vision_tp(plan, a))
        spread = plan.vision.placement in ("stage0_dp", "all_dp")  # images spread over the encoding stages' GPUs
        self.encode_ranks = tuple(r for s in plan.stages if s.vision and spread
                                  for r in par.replica_ranks[s.index * par.P:(s.index + 1) * par.P])
        self.encode_load = [0] * len(self.encode_ranks)  # patches dealt to each of them so far
        self.images_encoded = 0  # requests whose images this rank encoded
        if stage.lm_head:
            name = "lm_head.weight" if (not a.tie_embeddings and src.has("lm_head.weight")) else "model.embed_tokens.weight"
            w, _ = _vocab_rows(src, name, a.vocab, self.vocab_group)
            self.lm_head = w.to(dev, dtype)
            self.norm = src.rows("model.norm.weight").to(dev, dtype)
        self.layers = [DecoderLayer(i, a, par, src, dtype, shift, fp8) for i in range(stage.first_layer, stage.last_layer + 1)]
        kv_local = kv_heads_per_gpu(a.kv_heads, par.P)
        self.caches = [LayerCache(num_slots, kv_local, a.head_dim, kv_dtype, dev) for _ in self.layers]
        self.freq, self.rope_scale = inv_freq(a)
        self.freq = self.freq.to(dev)  # on the device: a captured decode graph reads it
        self.image_embeds: dict[int, torch.Tensor] = {}  # request id -> [image tokens, hidden]

    def _vision_tp(self, plan: Plan, a: ModelArgs) -> tuple[Any, int, int]:
        """The tower TP-sharded over the stage's P GPUs where ``ParallelDims.encoder`` says so
        (``stage0_tp``, or ``none``, when its heads and MLP width divide by P), else whole per GPU."""
        g = self.vocab_group
        if g is None or plan.dims().encoder(a.vision.num_heads, a.vision.mlp_dim).tp == 1:
            return None, 0, 1
        return g, dist.get_rank(g), dist.get_world_size(g)

    # ------------------------------------------------------------------ embedding + vision
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: rows outside this shard give zeros; all-reduce sums the shards."""
        n = self.embed.shape[0]
        if n == self.a.vocab:
            return F.embedding(tokens, self.embed)
        local = tokens - self.embed_lo
        ok = (local >= 0) & (local < n)
        x = F.embedding(local.clamp(0, n - 1), self.embed) * ok[:, None].to(self.dtype)
        return all_reduce(x, self.vocab_group)

    def receive_images(self, jobs: list[ImageJob]) -> None:
        """Encode (or receive) the step's images where the plan places the encoder, so that every
        stage-0 GPU holds each job's ``[rows, hidden]`` embeddings (see ``executors.encoders``).
        Every rank of the replica calls it at the start of each step."""
        if not jobs or self.a.vision is None:
            return
        par, where = self.par, self.plan.vision.placement
        if where in ("none", "stage0_tp"):  # stage 0's GPUs encode every image together
            if self.embed is not None:
                for j in jobs:
                    self.image_embeds[j.req] = self._encode(j)
            return
        m2 = self.a.vision.merge ** 2
        got = exchange(jobs, self.encode_ranks, self.encode_load, par.stage0_ranks, par.rank, self._encode,
                       lambda j: (j.patches // m2, self.a.hidden), self.dtype, par.device)
        self.image_embeds.update(got)

    def _encode(self, j: ImageJob) -> torch.Tensor:
        self.images_encoded += 1
        return self.vision(j.pixels, j.grid)

    def forget(self, finished: list[int]) -> None:
        """Drop finished requests' image embeddings (preempted ones keep theirs for the recompute)."""
        for r in finished:
            self.image_embeds.pop(r, None)

    # ------------------------------------------------------------------ forward
    def forward(self, mb: MicroBatch, h_in: torch.Tensor | None) -> torch.Tensor:
        """``[T, hidden]`` hidden states (non-last stage) or ``[S, V]`` logits (last stage)."""
        par, dev = self.par, self.par.device
        T = mb.num_tokens
        if self.embed is not None:
            x = self._embed(mb.tokens.to(dev))
            if mb.img_tok.numel():
                rows = torch.cat([self.image_embeds[r][s:s + n] for r, s, n in mb.img_src])
                x[mb.img_tok.to(dev)] = rows.to(x.dtype)
        else:
            x = h_in
        mode = mb.mode_of(self.stage.index)
        sp = par.sp if (mode == "sp_tp" and par.sp > 1) else 1
        t_pad = -(-T // sp) * sp
        slots = torch.full((t_pad,), -1, dtype=torch.long)
        slots[:T] = mb.slots
        dec = decode_keys(mb, self.scratch_slot, self.block_size) if (t_pad == T and self.caches and dev.type != "cuda") else None
        if mb.decode and t_pad == T and dev.type == "cuda":  # decodes read their KV blocks through the table
            meta = self.table_meta(slots.to(dev), mb.block_table().to(dev), torch.tensor(mb.ctx, device=dev))
        elif dec is not None:  # one query per sequence: attend over each sequence's own keys
            meta = AttnMeta(slots.to(dev), mb.key_slots.to(dev), None, dec[0].to(dev), dec[1].to(dev))
        elif dev.type == "cuda":  # fused kernels per sequence; no [T, K] mask
            mb = mb.with_keys(self.block_size)
            meta = AttnMeta(slots.to(dev), mb.key_slots.to(dev), None, seqs=sequence_spans(mb))
        else:
            mb = mb.with_keys(self.block_size)
            meta = AttnMeta(slots.to(dev), mb.key_slots.to(dev), packed_mask(mb, t_pad, dev))
        pos = mb.pos
        if sp > 1:
            n = t_pad // sp
            lo = par.sp_i * n
            x = F.pad(x, (0, 0, 0, t_pad - T))[lo:lo + n]
            pos = F.pad(pos, (0, t_pad - T))[..., lo:lo + n]
        x = self.layers_forward(x, pos.to(dev), meta, mode if par.sp > 1 else "tp")
        if sp > 1:
            x = all_gather_cat(x, par.sp_group, sp)[:T]
        if self.lm_head is None:
            return x
        return self.logits(x[mb.sample_idx.to(dev)])

    @property
    def block_size(self) -> int:
        return self.plan.scheduler.block_size

    @property
    def scratch_slot(self) -> int:
        """The cache slot that padding tokens write and padding keys point at (never read as real)."""
        return self.caches[0].k.shape[0] - 1 if self.caches else 0

    def layers_forward(self, x: torch.Tensor, pos: torch.Tensor, meta: AttnMeta, mode: str) -> torch.Tensor:
        """The stage's decoder layers on ``x [n, hidden]`` at rotary positions ``pos [n]`` (or
        ``[3, n]``), all on the device: no host synchronisation, so a CUDA graph can capture it."""
        cos, sin = cos_sin(pos, self.freq, self.rope_scale, self.a.mrope_section)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        for layer, cache in zip(self.layers, self.caches):
            x = layer.forward(x, mode, cos, sin, cache, meta)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and vocab-parallel lm_head: ``x [S, hidden]`` -> ``[S, V]`` fp32."""
        h = rms_norm(x, self.norm, self.a.rms_eps)
        logits = F.linear(h, self.lm_head).float()  # [S, V/P]
        if self.lm_head.shape[0] != self.a.vocab:
            n = dist.get_world_size(self.vocab_group)
            logits = all_gather_cat(logits.t().contiguous(), self.vocab_group, n).t()
        return logits

    def decode_forward(self, tokens: torch.Tensor, h_in: torch.Tensor | None, pos: torch.Tensor,
                       slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """A decode micro-batch in plain TP mode from device tensors alone (what a decode CUDA graph
        captures): ``tokens [B]`` (or ``h_in [B, hidden]`` on later stages), ``pos [B]`` or
        ``[3, B]``, ``slots [B]`` (the slot each new key is written to), ``table [B, nb]`` each
        sequence's KV blocks (padded with block 0), ``lens [B]`` its number of keys.
        Returns ``[B, V]`` logits (last stage) or ``[B, hidden]``."""
        x = self._embed(tokens) if self.embed is not None else h_in
        x = self.layers_forward(x, pos, self.table_meta(slots, table, lens), "tp")
        return x if self.lm_head is None else self.logits(x)

    def table_meta(self, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> AttnMeta:
        """Decode attention inputs from a block table ``[S, nb]`` and key counts ``lens [S]`` (device
        tensors): key ``p`` of sequence i is real when ``p < lens[i]``."""
        mask = torch.arange(table.shape[1] * self.block_size, device=table.device)[None, :] < lens[:, None]
        return AttnMeta(slots, table, None, seq_mask=mask, table=table, block_size=self.block_size, seq_lens=lens)
