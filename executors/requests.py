"""Requests, sampling settings and results of the Python API, and per-request validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executors.config import ModelArgs
from executors.images import ImageInput, load_image
from executors.scheduler import Seq
from plans.errors import UserError


@dataclass
class Request:
    """``tokens`` (ids) or ``prompt`` (text, needs a tokenizer); images as files or ImageInput.

    An image is marked in ``tokens`` by one image-pad token (expanded here to its
    ``t*h*w / merge^2`` tokens) or by the already expanded run of them.
    """

    tokens: list[int] | None = None
    prompt: str | None = None
    images: list[str | Path | ImageInput] = field(default_factory=list)
    max_new_tokens: int | None = None


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    seed: int = 0
    stop_on_eos: bool = True


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    error: str | None = None
    logits: torch.Tensor | None = None  # [generated, V] fp32, when the engine keeps logits
    prompt_tokens: list[int] = field(default_factory=list)


def mrope_positions(tokens: list[int], image_token: int, grids: list[tuple[int, int, int]], merge: int) -> tuple[torch.Tensor, int]:
    """Qwen2-VL M-RoPE positions ``[3, L]`` of a prompt and the delta for later tokens.

    Text advances all rows by 1; an image of LLM grid ``(t, h, w)`` (after merging) starting at
    position ``s`` takes ``(s + t_i, s + h_i, s + w_i)`` and the next text starts at ``s + max(h, w)``.
    Later tokens ``i >= L`` take ``i + delta`` with ``delta = max + 1 - L``.
    """
    cols: list[torch.Tensor] = []
    cur, i, g = 0, 0, 0
    L = len(tokens)
    while i < L:
        if tokens[i] == image_token:
            t, h, w = grids[g]
            h, w = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            cols.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur)
            cur += max(h, w)
            i += t * h * w
            g += 1
        else:
            j = i
            while j < L and tokens[j] != image_token:
                j += 1
            cols.append(torch.arange(cur, cur + j - i)[None].repeat(3, 1))
            cur += j - i
            i = j
    pos = torch.cat(cols, dim=1)
    return pos, int(pos.max()) + 1 - L


def join_pixels(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The images' patches ``[N_i, patch_dim]`` as one ``[sum N_i, patch_dim]`` tensor of ``dtype``:
    each copied and cast in one pass into the output (a cat, then a cast, read and wrote the pixels
    twice on the driver's thread: ``make_seq`` of a request with two 896x896 images took 25 ms on one
    CPU core, now 4.8).

    Where CUDA is present the output is page-locked, so the tower's step uploads it asynchronously at
    the copy engine's rate: from pageable memory the upload was a synchronous staged copy on the
    step's stream, 4.4 ms for four images (15,376 patches, 36 MB of bf16) of a 76 ms tower step
    (``bench/results/step_profile.md``). Pinning here puts the host copy where the request is built,
    not inside a step. Without CUDA, one image already of ``dtype`` is returned as is."""
    pin = torch.cuda.is_available()
    if len(parts) == 1 and parts[0].dtype == dtype and not pin:
        return parts[0]
    out = torch.empty(sum(x.shape[0] for x in parts), parts[0].shape[1], dtype=dtype, pin_memory=pin)
    row = 0
    for x in parts:
        out[row:row + x.shape[0]].copy_(x)
        row += x.shape[0]
    return out


def make_seq(rid: int, req: Request, a: ModelArgs, max_new: int, tokenizer: Any, total_slots: int,
             pixel_dtype: torch.dtype = torch.float32) -> Seq:
    """Validate one request and build its sequence; UserError names what is wrong. Image patches
    are kept in ``pixel_dtype`` (the tower's compute dtype, which its patch embedding casts them to
    anyway): a bf16 448x448 image is 2.4 MB on its way to the ranks instead of 4.8 MB."""
    toks = req.tokens
    if toks is None and req.prompt is not None:
        if tokenizer is None:
            raise UserError("a text prompt needs a tokenizer: give token ids, or a tokenizer directory")
        toks = list(tokenizer.encode(req.prompt))
    toks = list(toks or [])
    if not toks:
        raise UserError("empty request: no prompt tokens")
    bad = [t for t in toks if not 0 <= int(t) < a.vocab]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{a.vocab - 1})")
    s = Seq(req=rid, tokens=toks, prompt_len=len(toks), max_new=max_new)
    if req.images:
        if a.vision is None or a.image_token_id is None:
            raise UserError(f"request has {len(req.images)} image(s) but the model ({a.arch}) has no vision tower")
        imgs = [im if isinstance(im, ImageInput) else load_image(im, a.vision) for im in req.images]
        per = [im.grid[0] * im.grid[1] * im.grid[2] // a.vision.merge**2 for im in imgs]
        n_pad = sum(1 for t in toks if t == a.image_token_id)
        if n_pad == len(imgs) and sum(per) != n_pad:
            out, k = [], 0
            for t in toks:
                if t == a.image_token_id:
                    out += [t] * per[k]
                    k += 1
                else:
                    out.append(t)
            toks = out
        elif n_pad != sum(per):
            raise UserError(f"request has {len(imgs)} image(s) ({sum(per)} image tokens) but {n_pad} image-pad "
                            f"token(s) (id {a.image_token_id}); give one per image or the expanded run")
        s = Seq(req=rid, tokens=toks, prompt_len=len(toks), max_new=max_new)
        s.image_pixels = join_pixels([im.pixels for im in imgs], pixel_dtype)
        s.image_grid = [im.grid for im in imgs]
        s.image_tok_idx = [i for i, t in enumerate(toks) if t == a.image_token_id]
    if a.is_vl:
        if s.image_grid:
            s.mrope, s.mrope_delta = mrope_positions(toks, a.image_token_id, s.image_grid, a.vision.merge)
        else:
            s.mrope, s.mrope_delta = torch.arange(len(toks))[None].repeat(3, 1), 0
    need = len(toks) + max_new
    if need > a.max_positions:
        raise UserError(f"prompt of {len(toks)} tokens + {max_new} new tokens = {need} exceeds the context "
                        f"this engine serves ({a.max_positions} tokens: the model's, or load's max_context)")
    if need > total_slots:
        raise UserError(f"prompt of {len(toks)} tokens + {max_new} new tokens = {need} exceeds the KV cache "
                        f"of one replica ({total_slots} token slots)")
    return s
