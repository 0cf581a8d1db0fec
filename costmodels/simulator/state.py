"""Mutable state of a simulation: requests in flight, scheduler lanes, replicas, the KV pool."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WAITING, PREFILL, DECODE, DONE, REJECTED = range(5)


class Req:
    """A request being served.

    ``prompt``: tokens its (next) prefill must process: the prompt, or after a preemption the
    prompt plus the tokens generated so far (recompute). ``done``: prompt tokens prefilled so far.
    ``produced``: output tokens generated. KV held: the whole prompt from admission (reserved),
    then ``prompt + (lane.steps - d0)`` tokens in decode, in ``ceil(tokens / block_size)`` blocks.
    """

    __slots__ = ("id", "arrival", "prompt0", "prompt", "out", "done", "produced", "state", "lane",
                 "d0", "first", "finish", "patches", "img_tokens", "encoded", "preempts", "replica", "queued")

    def __init__(self, id: int, arrival: float, prompt: int, out: int, patches: tuple[int, ...],
                 img_tokens: int):
        self.id, self.arrival, self.prompt0, self.prompt, self.out = id, arrival, prompt, prompt, out
        self.done = self.produced = self.d0 = self.preempts = 0
        self.state = WAITING
        self.lane: Lane | None = None  # the lane it was routed to
        self.first: float | None = None
        self.finish: float | None = None
        self.patches, self.img_tokens = patches, img_tokens
        self.encoded = not patches
        self.replica = -1
        self.queued = arrival  # when it joined its lane's waiting queue (its images' arrival, with a dedicated encoder)

    def kv(self, lane_steps: int) -> int:
        """Tokens this request holds in the KV cache."""
        if self.state == DECODE:
            return self.prompt + (lane_steps - self.d0)
        return self.prompt if self.state == PREFILL else 0

    def edge(self, block: int) -> int:
        """The lane steps (mod ``block``) at which this decoding request fills a block, so that its
        next token opens a new one: ``prompt + (s - d0) = 0 (mod block)``."""
        return (self.d0 - self.prompt) % block


@dataclass
class Lane:
    """One scheduler of a replica with at most one micro-batch in flight (a PP "virtual engine":
    requests are routed to a lane on arrival and stay there).

    Decoding requests join at lane step ``d0`` and take part in every later step of the lane, so
    one that needs r more tokens finishes at step d0 + r: ``heap`` holds (d0 + r, id, req), and the
    per-step work is independent of the batch size. ``ctx`` is the sum of their KV tokens;
    ``longest`` a heap of (d0 - prompt, id, d0, req), whose valid top is the request holding the
    most (``prompt + steps - d0``: the difference is fixed while it decodes; entries of requests
    that left are dropped when they surface). ``edges[k]``: how many of them open a new KV block at lane steps ``s = k (mod block)``
    (``Req.edge``), so a step's new blocks are counted without visiting every request.
    """

    index: int
    replica: "Replica"
    waiting: deque = field(default_factory=deque)  # requests routed to this lane, not yet admitted
    outstanding: int = 0  # requests routed here and not finished (the router's load)
    decoding: dict[int, Req] = field(default_factory=dict)  # admission order (newest last)
    heap: list = field(default_factory=list)
    longest: list = field(default_factory=list)
    edges: dict[int, int] = field(default_factory=dict)
    prefilling: list[Req] = field(default_factory=list)
    steps: int = 0
    ctx: int = 0
    busy: bool = False
    kicked: bool = False  # a SCHEDULE event is pending
    ahead: bool = False  # the next step is formed when the last one is sent (look-ahead, ``SimConfig.lookahead``)
    sent: float = 0.0  # when the lane's last step was sent (s)


@dataclass
class Replica:
    """A data-parallel replica: its lanes, its KV pool (shared by the lanes, counted in blocks of
    ``block`` tokens, as the executor's paged cache) and its stage clocks."""

    index: int
    kv_cap: int  # blocks
    pp: int
    block: int = 1  # tokens per KV block
    lanes: list[Lane] = field(default_factory=list)
    kv_used: int = 0  # blocks
    kv_peak: int = 0
    kv_area: float = 0.0  # integral of kv_used over time (block-seconds), up to kv_t
    kv_t: float = 0.0
    outstanding: int = 0  # requests routed here and not finished (the router's load)
    running: int = 0  # requests admitted (prefilling or decoding) in any lane
    stage_free: list[float] = field(default_factory=list)
    stage_busy: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stage_free = [0.0] * self.pp
        self.stage_busy = [0.0] * self.pp

    def blocks(self, tokens: int) -> int:
        """KV blocks that hold ``tokens`` tokens of one sequence."""
        return -(-tokens // self.block)

    def kv_clock(self, t: float) -> None:
        """Integrate KV use up to ``t``; call before kv_used changes."""
        self.kv_area += self.kv_used * (t - self.kv_t)
        self.kv_t = t
