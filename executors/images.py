"""Turn an image file into Qwen2-VL patches (the HF processor's layout, without the hub).

Resize to multiples of ``patch * merge`` (28 px) keeping the pixel count within
``[min_pixels, max_pixels]``, normalise with the CLIP mean/std, repeat the frame to the temporal
patch (2), and cut ``[t*h*w, C * t_patch * p * p]`` patches grouped by ``merge x merge`` blocks.
An image of ``H x W`` px then gives ``(H/28) * (W/28)`` LLM tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from executors.config import VisionArgs
from plans.errors import UserError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageInput:
    """Preprocessed patches of one image and its patch grid ``(t, h, w)``."""

    pixels: torch.Tensor
    grid: tuple[int, int, int]


def smart_size(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def patchify(img: torch.Tensor, v: VisionArgs) -> ImageInput:
    """``img [C, H, W]`` normalised, H and W multiples of ``patch * merge`` -> patches."""
    C, H, W = img.shape
    p, m, tp = v.patch_size, v.merge, v.temporal_patch_size
    frames = img[None].repeat(tp, 1, 1, 1)  # [tp, C, H, W]
    gh, gw = H // p, W // p
    x = frames.reshape(1, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, C * tp * p * p)
    return ImageInput(x.contiguous(), (1, gh, gw))


def load_image(path: str | Path, v: VisionArgs, min_pixels: int = 4 * 28 * 28, max_pixels: int = 1280 * 28 * 28) -> ImageInput:
    """Read and preprocess an image file; UserError when it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            factor = v.patch_size * v.merge
            h, w = smart_size(im.height, im.width, factor, min_pixels, max_pixels)
            im = im.resize((w, h), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    except ImportError:
        raise UserError("reading image files needs Pillow (pip install pillow)") from None
    except Exception as e:  # PIL raises many types for bad files
        raise UserError(f"cannot read image {path}: {e}") from None
    x = data.permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return patchify(x, v)
