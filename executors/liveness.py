"""Under torchrun: a heartbeat per rank in torchrun's store, so that a rank that dies or stops answering
ends the run on every rank with one message and exit code 2 instead of a hang.

A collective cannot tell a dead peer from a slow one. Gloo fails at once only when the peer's
socket closes (a killed process, not a stopped one or a lost node); NCCL waits for the process
group's timeout (10 minutes); and a rank may legitimately wait in the step broadcast for as long as
rank 0 has no work, so a short timeout on collectives is no answer. Instead every rank runs a
thread that adds 1 to its counter ``beat/<rank>`` in the store (torchrun's, at ``MASTER_ADDR:
MASTER_PORT``) every ``BEAT_S`` and reads every rank's counter. The rule:

- a rank whose counter has not moved for ``silent_s`` (``SHIFTPLAN_SILENT_S``, default 30 s) died
  or stopped answering; once a collective has failed in this process (``collectives``: gloo's
  closed socket) the window is ``FAILED_BEATS`` beats, so a killed rank is named within seconds;
- the first rank to find one writes the verdict under ``down``; every rank reads that key each
  beat, so all of them name the same culprit;
- a store that stops answering is a verdict too (it lives in torchrun's launcher on node 0);
- rank 0 waiting for a step for ``SHIFTPLAN_STEP_TIMEOUT_S`` (``awaiting``) though every rank beats is
  a verdict: a rank stuck in a kernel or a collective keeps its heartbeat thread beating;
- a rank whose own work raises (building its stage, running a step: ``collectives``) writes the
  verdict itself, naming its error's first line, so no rank waits for its heartbeat to stop;
- each rank then exits with code 2 from the watch thread (``os._exit``: a process blocked in a
  collective with a dead peer cannot unwind, nor can its process group be torn down); the lowest
  live rank of each node first prints the verdict as one ``error:`` line.

Before any of that, while the ranks join: a rank that stops on an error before joining (``plan run``'s
checks on its node) writes the verdict itself (``announce_failure``), and ranks wait for each other
in the store (``wait_for_peers``), so they read it, rather than in the process group's rendezvous,
which waits for its timeout.

On an orderly shutdown ``stop`` ends the watch first. The process group keeps torch's timeout (gloo
30 min, NCCL 10 min), which still ends a rank that idles in a collective for longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import NoReturn

import torch.distributed as dist

from plans.errors import describe, first_line

BEAT_S = 1.0
SILENT_S = 30.0
FAILED_BEATS = 3


PREFIX = "shiftplan/liveness"


def _store(timeout_s: float) -> dist.PrefixStore:
    """A client of torchrun's store (``MASTER_ADDR:MASTER_PORT``, kept by node 0's launcher), its keys
    under ``PREFIX`` and the launch's restart count (a restarted group starts with no verdict)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(f"{PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _this_rank() -> str:
    return f"rank {os.environ.get('RANK', '?')} on node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"


def announce_failure(message: str) -> None:
    """Under torchrun, a rank that stops on an error before it joined the process group (``plan run``'s
    checks found a file only its node lacks, say) writes the verdict, so the ranks waiting for it in
    ``wait_for_peers`` stop at once instead of at torchrun's rendezvous timeout. Best effort: a store
    that does not answer within a few seconds is left alone."""
    try:
        first = first_line(message, "an error")
        _store(5.0).compare_set("down", "", json.dumps([[], f"{_this_rank()} failed: {first}; every rank stops"]))
    except Exception:
        pass


JOIN_S = 600.0  # NCCL's own timeout: the longest ranks wait for each other to join (SHIFTPLAN_JOIN_S)


def wait_for_peers(world: int) -> None:
    """Before the process group is set up: count this rank in and wait until all ``world`` ranks
    have, or end with code 2 and one line a node (from its local rank 0) when one of them wrote a
    verdict (``announce_failure``), torchrun's store went away (node 0's launcher ended) or
    ``SHIFTPLAN_JOIN_S`` passed (a rank that died before joining says nothing)."""
    limit = float(os.environ.get("SHIFTPLAN_JOIN_S", JOIN_S))
    try:
        store = _store(SILENT_S)
        store.add("joined", 1)
        end = time.monotonic() + limit
        while True:
            if store.check(["down"]):
                message = json.loads(store.get("down"))[1]
                break
            joined = store.add("joined", 0)
            if joined >= world:
                return
            if time.monotonic() > end:
                message = (f"{joined} of {world} ranks joined within {limit:g} s (SHIFTPLAN_JOIN_S): a rank died "
                           "before joining, see its node's output; every rank stops")
                break
            time.sleep(0.1)
    except Exception as e:
        first = first_line(str(e), type(e).__name__)
        message = (f"lost torchrun's store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} while the "
                   f"ranks joined: node 0's launcher ended, see its output ({first})")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        sys.stdout.flush()
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    os._exit(2)


class Liveness:
    """This rank's heartbeat and its watch on every other rank's, from construction (once the process
    group is up: every rank builds one at the same point). ``mesh_size``: ranks from it on are
    dedicated encoder ranks (named so)."""

    def __init__(self, mesh_size: int, silent_s: float | None = None):
        self.rank, self.world, self.mesh_size = dist.get_rank(), dist.get_world_size(), mesh_size
        self.silent_s = silent_s if silent_s is not None else float(os.environ.get("SHIFTPLAN_SILENT_S", SILENT_S))
        self.address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        self.where = f"{self.address[0]}:{self.address[1]}"
        self.store = _store(max(self.silent_s, 10.0))
        self.keys = [f"beat/{r}" for r in range(self.world)]
        self.store.add(self.keys[self.rank], 1)
        node = f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"
        self.nodes: list[str] = [""] * self.world
        dist.all_gather_object(self.nodes, node)  # also: every rank's counter exists from here on
        self.failed, self.stopped = threading.Event(), threading.Event()
        self.ending = threading.Lock()  # held by the thread that ends this process (``_end``)
        from executors.engine import step_timeout_s

        self.step_timeout_s = step_timeout_s()
        self.awaited: tuple[float, str] | None = None  # (since, what) while rank 0 waits for a step: ``awaiting``
        threading.Thread(target=self._watch, name="shiftplan-liveness", daemon=True).start()

    def stop(self) -> None:
        """An orderly shutdown: end the watch (peers that exit now are not reported)."""
        self.stopped.set()

    @contextlib.contextmanager
    def collectives(self) -> Iterator[None]:
        """Around a rank's work (building its stage, serving steps, their collectives): a collective
        that raises (gloo: a peer's socket closed) shortens the watch's window to ``FAILED_BEATS``
        beats, and this thread waits while the watch names the silent rank and ends the process; if
        every rank still beats, or the error was no collective's, it is this rank's own: ``fail``."""
        try:
            yield
        except Exception as e:
            if isinstance(e, RuntimeError):
                self.failed.set()
                time.sleep((FAILED_BEATS + 3) * BEAT_S)
            self.fail(e)

    @contextlib.contextmanager
    def awaiting(self, what: str) -> Iterator[None]:
        """Around rank 0's wait for a step (its own run, a replica's answer): the watch stops every
        rank when the wait lasts ``SHIFTPLAN_STEP_TIMEOUT_S`` though every rank beats (a rank stuck in
        a kernel spinning on a peer's flag, or in a collective, keeps its heartbeat thread beating)."""
        self.awaited = (time.monotonic(), what)
        try:
            yield
        finally:
            self.awaited = None

    def fail(self, e: Exception) -> NoReturn:
        """This rank's own error (a checkpoint without a tensor, a GPU out of memory): the verdict names
        this rank and the error's first line, and every rank exits with code 2 (this one now, the
        others at their next beat) instead of waiting for this one's heartbeat to stop."""
        first = first_line(describe(e), type(e).__name__)
        self.stop_all(f"{self._ranks([self.rank])} on {self.nodes[self.rank]} failed: {first}; every rank stops")
        raise e  # after an orderly ``stop``: no verdict, the error goes up as it is

    def stop_all(self, message: str) -> None:
        """Write ``message`` as the verdict (unless one was written first, which stands) and exit with
        code 2; every other rank reads it at its next beat and exits too."""
        verdict = json.dumps([[], message])
        try:
            down = self.store.compare_set("down", "", verdict)
        except Exception:  # the store is gone: this node still says why this rank stops
            down = verdict
        self._end(*json.loads(down))

    def _watch(self) -> None:
        last: list[bytes] = [b""] * self.world
        moved = [time.monotonic()] * self.world
        while not self.stopped.is_set():
            try:
                if self.failed.is_set():  # a peer's socket closed: is the store's launcher gone too?
                    socket.create_connection(self.address, timeout=BEAT_S).close()
                self.store.add(self.keys[self.rank], 1)
                counts = self.store.multi_get(self.keys)
                down = self.store.get("down") if self.store.check(["down"]) else None
                now = time.monotonic()
                for r, c in enumerate(counts):
                    if c != last[r]:
                        last[r], moved[r] = c, now
                window = FAILED_BEATS * BEAT_S if self.failed.is_set() else self.silent_s
                silent = [r for r in range(self.world) if r != self.rank and now - moved[r] > window]
                if down is None and silent:  # the first verdict written stands
                    down = self.store.compare_set("down", "", json.dumps([silent, self._verdict(silent, window)]))
                awaited = self.awaited
                if down is None and awaited is not None and now - awaited[0] > self.step_timeout_s:
                    down = self.store.compare_set("down", "", json.dumps([[], (
                        f"rank {self.rank} waited {now - awaited[0]:.0f} s for {awaited[1]} though every rank "
                        "beats: a rank is stuck (a kernel or collective waiting on a peer?); every rank stops "
                        f"(SHIFTPLAN_STEP_TIMEOUT_S sets the limit, now {self.step_timeout_s:g} s)")]))
            except Exception as e:  # the store is gone or does not answer
                first = first_line(str(e), type(e).__name__)
                down = json.dumps([[], f"lost torchrun's store at {self.where}, kept by the launcher of "
                                       f"{self.nodes[0]}: that node's ranks died or its launcher stopped ({first})"])
            if down is not None:
                self._end(*json.loads(down))
            self.stopped.wait(BEAT_S)

    def _verdict(self, silent: list[int], window: float) -> str:
        by_node: dict[str, list[int]] = {}
        for r in silent:
            by_node.setdefault(self.nodes[r], []).append(r)
        who = "; ".join(f"{self._ranks(rs)} on {node}" for node, rs in by_node.items())
        return f"{who} died or stopped answering (no heartbeat for {window:g} s); every rank stops"

    def _ranks(self, ranks: list[int]) -> str:
        roles = {"encoder" if r >= self.mesh_size else "worker" for r in ranks}
        role = roles.pop() + " " if len(roles) == 1 else ""
        return f"{role}rank {ranks[0]}" if len(ranks) == 1 else f"{role}ranks {', '.join(map(str, ranks))}"

    def _end(self, silent: list[int], message: str) -> None:
        """Exit with code 2; the lowest live rank of this node prints the verdict first. Each rank
        counts itself under ``seen`` and waits (a few beats at most) for every live rank to have read
        the verdict: node 0's ranks exiting at once would end its launcher, and the store with it,
        before the other nodes read why."""
        if self.stopped.is_set():
            return
        if not self.ending.acquire(blocking=False):  # the other thread is ending this process already
            while True:
                time.sleep(1.0)
        node = [r for r in range(self.world) if self.nodes[r] == self.nodes[self.rank]]
        if self.rank == min([r for r in node if r not in silent] or node):
            sys.stdout.flush()
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
        try:
            self.store.add("seen", 1)
            end = time.monotonic() + 3 * BEAT_S
            while self.store.add("seen", 0) < self.world - len(silent) and time.monotonic() < end:
                time.sleep(0.05)
        except Exception:  # the store is gone: nothing to wait for
            pass
        os._exit(2)
