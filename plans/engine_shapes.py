"""The engine's launch shapes, written once: the batch and key buckets of its CUDA step graphs and
how its paged decode kernel cuts each sequence's keys into ranges.

The executors launch by them (``executors.graphs``, ``executors.paged_decode``,
``executors.paged_prefill``); the cost model prices by them (``costmodels.opcost``,
``costmodels.steps``, ``costmodels.model``) without importing torch, so planning for a GPU whose
profile prices this engine stays torch-free: no import but ``plans.mesh``, which holds the token
buckets of the step graphs (``GRAPH_TOKEN_BUCKETS``). Last, after which steps the engine forms the
next one ahead (``LOOKAHEAD_MAX_TOKENS``).

Step graphs (``executors.graphs``): a decode step of ``S`` sequences runs the graph of batch bucket
``B >= S`` (``BATCH_BUCKETS``); a prefill or mixed step's graph holds room for ``max_seqs``' bucket of
sequences. Each graph's block table is as wide as the key bucket ``L`` of the step's longest context
(``keys_bucket``: the next power of two, at least ``MIN_KEYS``).

Key ranges of the paged decode kernel (flash decoding, ``executors.paged_decode``): one program per
``(sequence, KV head, range)``; ``splits`` cuts a table of ``L`` keys into ``nsplit`` ranges of whole
``DECODE_BLOCK_N`` keys, enough programs to fill the GPU (``TARGET_PROGRAMS``), at most
``MAX_KEYS_PER_SPLIT`` keys a range (``capped_ranges``; the paged prefill kernel's ranges follow the
same cap) and at most ``MAX_SPLITS`` ranges. ``graph_splits`` is the cut of a captured mixed step's
decodes over its sequence slots.
"""

from __future__ import annotations

from plans.mesh import GRAPH_TOKEN_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
MIN_KEYS = 512

DECODE_BLOCK_N = 64  # keys per inner iteration of the decode kernel (its BLOCK_N): ranges hold whole blocks
TARGET_PROGRAMS = 264  # about two per SM on an H100/H200 (132 SMs)
MAX_SPLITS = 64  # the combine kernel holds every range of a head at once
# cap on a range's keys: with contexts of 300-5,000 keys, 32 sequences take 63.6 us a layer against 98.0
# uncapped (64: 116.0 against 146.3; equal lengths unchanged, Llama's 100-2,000 keys 97.3 against 94.1):
# bench/results/decode_splits.md
MAX_KEYS_PER_SPLIT = 1024
# with ``rows`` (a captured mixed step's decodes among its sequence slots, how many unknown until replay) the
# ranges fill the GPU as for this many decodes where a table holds more than one range's keys; where it holds
# one (key buckets up to 1,024), one range, so no combine launches over every slot (graph_splits; measured on
# an H200 for 257 slots: bench/results/graph_decodes.sweep.md)
GRAPH_FILL_SEQS = 16


def keys_bucket(n: int) -> int:
    """Key width for a longest context of ``n``: the next power of two, at least ``MIN_KEYS``. A
    graph is captured per bucket (tens of ms a capture, at warm-up), so buckets are few: the
    kernels read only each sequence's own keys, the width sets the block table's size (and the
    decode kernel's key ranges)."""
    return max(MIN_KEYS, 1 << (max(1, n) - 1).bit_length())


def key_sizes(max_keys: int, block: int) -> tuple[int, ...]:
    """Every key bucket ``L`` up to ``max_keys`` keys, each a multiple of the block size."""
    top = keys_bucket(max_keys)
    return tuple(-(-b // block) * block for b in (MIN_KEYS << i for i in range(top.bit_length())) if b <= top)


def capped_ranges(keys: int) -> int:
    """The fewest key ranges of at most ``MAX_KEYS_PER_SPLIT`` keys that ``keys`` keys fill (1 with
    no cap, ``MAX_KEYS_PER_SPLIT = 0``); the paged prefill kernel's ranges follow the same cap."""
    return -(-keys // MAX_KEYS_PER_SPLIT) if MAX_KEYS_PER_SPLIT else 1


def splits(S: int, hkv: int, max_keys: int) -> tuple[int, int]:
    """``(nsplit, keys_per_split)`` of the decode kernel for ``S`` sequences of ``hkv`` KV heads and a
    table of ``max_keys`` keys: enough programs to fill the GPU, ranges of whole ``DECODE_BLOCK_N`` and
    at most ``MAX_KEYS_PER_SPLIT`` keys (0: no cap)."""
    chunks = max(1, -(-max_keys // DECODE_BLOCK_N))
    want = max(-(-TARGET_PROGRAMS // (S * hkv)), capped_ranges(chunks * DECODE_BLOCK_N))
    nsplit = max(1, min(chunks, want, MAX_SPLITS))
    return nsplit, -(-chunks // nsplit) * DECODE_BLOCK_N


def graph_splits(S: int, hkv: int, max_keys: int) -> tuple[int, int]:
    """``splits`` of a captured mixed step's decodes over its ``S`` sequence slots
    (``executors.paged_decode.paged_decode`` with ``rows``): one range where ``max_keys`` fit one
    (``capped_ranges``): ranges over every slot would launch a combine of ``S x hq`` programs, most of
    them on slots with no decode; else cut to fill the GPU for ``GRAPH_FILL_SEQS`` decodes (few decodes
    of long contexts in as many programs as a decode step of them would have)."""
    return splits(S if capped_ranges(max_keys) <= 1 else min(S, GRAPH_FILL_SEQS), hkv, max_keys)


# The engine forms a single-stage replica's next step while its last one computes (``Engine._look_ahead``),
# hiding the driver's and the rank's host work before a step (about 1 ms on an H200 serving Llama-3.1-8B:
# bench/results/fidelity_2gpu.single.md against fidelity_2gpu.single_mixed_sync.md), but only after a step of
# at most this many tokens (a step graph's). A longer step runs eagerly for tens to hundreds of milliseconds,
# beside which that time is small, while a request arriving during it would wait a whole step more: the step
# formed ahead could not take it. The simulator forms steps ahead by the same rule.
LOOKAHEAD_MAX_TOKENS = GRAPH_TOKEN_BUCKETS[-1]
