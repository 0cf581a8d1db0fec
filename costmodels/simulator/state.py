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
    then ``prompt + (lane.steps - d0)`` in decode.
    """

    __slots__ = ("id", "arrival", "prompt0", "prompt", "out", "done", "produced", "state", "lane",
                 "d0", "first", "finish", "patches", "img_tokens", "encoded", "preempts", "replica")

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

    def kv(self, lane_steps: int) -> int:
        """Tokens this request holds in the KV cache."""
        if self.state == DECODE:
            return self.prompt + (lane_steps - self.d0)
        return self.prompt if self.state == PREFILL else 0


@dataclass
class Lane:
    """One scheduler of a replica with at most one micro-batch in flight (a PP "virtual engine":
    requests are routed to a lane on arrival and stay there).

    Decoding requests join at lane step ``d0`` and take part in every later step of the lane, so
    one that needs r more tokens finishes at step d0 + r: ``heap`` holds (d0 + r, id, req), and the
    per-step work is independent of the batch size. ``ctx`` is the sum of their KV tokens.
    """

    index: int
    replica: "Replica"
    waiting: deque = field(default_factory=deque)  # requests routed to this lane, not yet admitted
    outstanding: int = 0  # requests routed here and not finished (the router's load)
    decoding: dict[int, Req] = field(default_factory=dict)  # admission order (newest last)
    heap: list = field(default_factory=list)
    prefilling: list[Req] = field(default_factory=list)
    steps: int = 0
    ctx: int = 0
    busy: bool = False
    kicked: bool = False  # a SCHEDULE event is pending


@dataclass
class Replica:
    """A data-parallel replica: its lanes, its KV pool (shared by the lanes) and its stage clocks."""

    index: int
    kv_cap: int
    pp: int
    lanes: list[Lane] = field(default_factory=list)
    kv_used: int = 0
    kv_peak: int = 0
    kv_area: float = 0.0  # integral of kv_used over time (token-seconds), up to kv_t
    kv_t: float = 0.0
    outstanding: int = 0  # requests routed here and not finished (the router's load)
    running: int = 0  # requests admitted (prefilling or decoding) in any lane
    stage_free: list[float] = field(default_factory=list)
    stage_busy: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stage_free = [0.0] * self.pp
        self.stage_busy = [0.0] * self.pp

    def kv_clock(self, t: float) -> None:
        """Integrate KV use up to ``t``; call before kv_used changes."""
        self.kv_area += self.kv_used * (t - self.kv_t)
        self.kv_t = t
