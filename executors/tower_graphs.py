"""The vision tower replayed as CUDA graphs, one graph per (image grid, image count).

Run eagerly (even with its blocks compiled) the tower launches ~10 kernels a block from Python, 32
blocks for Qwen2-VL: for one 448x448 image (1,024 patches) the launches, not the ~2 ms of matmuls,
set its time. Its work depends only on the images' patch grids, so ``VisionTower.encode`` over
``k`` images of one grid ``(t, h, w)`` is captured once and replayed:

* a step's images are taken in runs of consecutive equal grids (``vision.equal_runs``); a run of
  ``n`` images is cut into power-of-two counts ``k`` (largest first: 7 -> 4, 2, 1), ``k`` at most
  ``max(1, max_patches / (t h w))``, so a grid has at most ``log2`` + 1 graphs and the images of a
  graph together hold at most ``max_patches`` patches (one larger image is a graph of its own);
* each graph reads a static ``pixels [k t h w, patch_dim]`` buffer (one device-to-device copy per
  replay) and writes a static ``[k t h w / merge^2, out_dim]`` output, copied out before the next
  replay; its rotary tables and spans (``VisionTower.prepare``) are made once, at capture;
* graphs share one memory pool of their own and are captured lazily, the first time a (grid,
  count) is met, up to ``max_graphs`` of them (user images come in any size: each new grid is a new
  graph, with static buffers of its own); chunks of any other (grid, count) run launched.

Only a whole tower on its GPU is replayed (``RankRunner``: single GPUs, ``stage0_dp``, ``all_dp``,
dedicated encoders). A TP-sharded tower (``stage0_tp`` over P > 1 GPUs) stays launched: its
all-reduces would be captured with it (every GPU of the stage encodes the same images in the same
order, so captures would pair up), but that has not run on two GPUs yet.

Results equal the eager tower's (same kernels, same shapes), which ``encode`` stays for CPU ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from executors.vision import TowerInputs, VisionTower, equal_runs

MAX_PATCHES = 16384  # patches of one graph's images together: 16 images of 448x448, 4 of 896x896
MAX_GRAPHS = 64  # graphs held at most; chunks of other (grid, count)s then run launched


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # [k t h w, patch_dim], static
    out: torch.Tensor  # [k t h w / merge^2, out_dim], static
    inputs: TowerInputs  # held for the graph's lifetime


def chunks(n: int, patches: int, max_patches: int = MAX_PATCHES) -> list[int]:
    """Image counts (powers of two, largest first) that ``n`` images of ``patches`` patches each are
    encoded in: each at most ``max(1, max_patches // patches)``. ``chunks(7, 1024) == [4, 2, 1]``."""
    cap = 1 << (max(1, max_patches // patches).bit_length() - 1)
    out = []
    while n:
        k = min(cap, 1 << (n.bit_length() - 1))
        out.append(k)
        n -= k
    return out


class TowerGraphs:
    """Called like the tower, ``(pixels [N, patch_dim], grid) -> [N / merge^2, out_dim]``, on a
    CUDA device: each chunk of equal grids (module doc) replays its graph."""

    def __init__(self, tower: VisionTower, max_patches: int = MAX_PATCHES, max_graphs: int = MAX_GRAPHS):
        self.tower, self.max_patches, self.max_graphs = tower, max_patches, max_graphs
        self.graphs: dict[tuple[tuple[int, int, int], int], _Graph] = {}
        self.pool = None
        self.capture_s = 0.0

    def __call__(self, pixels: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        dev = self.tower.inv_freq.device
        pixels = pixels.to(dev)
        outs, row = [], 0
        for g, n in equal_runs([tuple(x) for x in grid]):
            per = g[0] * g[1] * g[2]
            for k in chunks(n, per, self.max_patches):
                outs.append(self._replay(g, k, pixels[row:row + k * per]))
                row += k * per
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _replay(self, g: tuple[int, int, int], k: int, pixels: torch.Tensor) -> torch.Tensor:
        gr = self.graphs.get((g, k))
        if gr is None:
            if len(self.graphs) >= self.max_graphs:  # full: this shape runs launched
                return self.tower.encode(pixels, self.tower.prepare([g] * k))
            gr = self.graphs[(g, k)] = self._capture(g, k, pixels)
        gr.pixels.copy_(pixels)
        gr.graph.replay()
        return gr.out.clone()  # the next replay overwrites the static output

    def _capture(self, g: tuple[int, int, int], k: int, pixels: torch.Tensor) -> _Graph:
        from executors.graphs import capture

        t = time.perf_counter()
        inputs = self.tower.prepare([g] * k)
        static = pixels.clone()
        graph, out, self.pool = capture(lambda: self.tower.encode(static, inputs), static.device, self.pool)
        self.capture_s += time.perf_counter() - t
        return _Graph(graph, static, out, inputs)
