"""The engine under torchrun (one process per GPU, several nodes): rank 0 drives, all ranks work.

    torchrun --nnodes 2 --nproc-per-node 8 ... $(which plan) run PLAN --tokens 1,2,3

``executors.load`` sees torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) and
comes here: every rank joins the process group and builds its stage (the same ``RankRunner`` as
local workers). Rank 0 schedules; each step it broadcasts ``{replica: Step}`` to all ranks, every
rank runs its replica's step, and each replica's reporting rank (last stage, shift rank 0) sends
the sampled tokens back to rank 0 point-to-point. Dedicated encoder ranks (after the mesh) get
their encode jobs with the same broadcast; rank 0 admits those requests at once (stage 0's
receive waits for the encoder, and each encoder serves its jobs in order). Ranks other than 0 never return from ``load``:
they serve steps until rank 0 shuts down, then exit.

At the join, every rank checks that all nodes were launched alike (``check_same_launch``: the same plan,
model config and options). A rank that dies, stops answering or fails (its error raised while it builds its stage or serves a
step) is found by every other rank's heartbeat watch (``executors.liveness``): each exits with code
2, one ``error:`` line a node naming the rank (and the error), instead of waiting in a collective for
the process group's timeout.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import torch.distributed as dist

from executors.batch import Step, StepOut
from executors.engine import Engine
from executors.encoders import EncoderServer
from executors.liveness import Liveness, wait_for_peers
from executors.parallel import build_par, reporting_rank
from executors.worker import RankRunner, WorkerSpec, encoder_server, from_bytes, rank_device, to_bytes
from plans.schema import Plan


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def join(spec: WorkerSpec) -> tuple[RankRunner | EncoderServer, Liveness]:
    """Join torchrun's process group, start this rank's heartbeat and watch, and build this rank's
    stage (or its encoder)."""
    rank = int(os.environ["RANK"])
    dev = rank_device(spec, rank)
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        wait_for_peers(int(os.environ["WORLD_SIZE"]))  # a rank that failed before joining is named, not waited for
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    plan = Plan.model_validate_json(spec.plan_json)
    live = Liveness(plan.mesh.size)
    check_same_launch(spec, live)
    with live.collectives():  # a stage that cannot be built ends every rank, naming this one
        par = build_par(plan.mesh, rank, dev)
        return (RankRunner(spec, par) if par is not None else encoder_server(spec, dev)), live


def launch_facts(spec: WorkerSpec) -> dict[str, Any]:
    """What every rank must agree on, flattened to dotted names: the plan, the model config it
    resolved, and the options that shape the ranks' state (not the weights' path, which is each
    node's own)."""
    facts = {"plan": json.loads(spec.plan_json), "model": asdict(spec.args), "--seed": spec.seed,
             "KV blocks": spec.num_blocks, "backend": spec.backend, "device": spec.device.split(":")[0],
             "CUDA graphs": spec.cuda_graphs, "all-reduce": spec.all_reduce}
    flat: dict[str, Any] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = x

    walk("", facts)
    return flat


def _short(x: Any, most: int = 48) -> str:
    r = repr(x)
    return r if len(r) <= most else r[:most - 3] + "..."


def check_same_launch(spec: WorkerSpec, live: Liveness) -> None:
    """Every node was launched with the same plan, model config and options (a node with another
    revision of the plan file, another ``--seed`` or ``--max-context`` would build other stages and
    hang or give other tokens): else every rank stops with one message naming what differs from rank 0."""
    every: list[dict[str, Any]] = [{}] * dist.get_world_size()
    dist.all_gather_object(every, launch_facts(spec))
    for r, theirs in enumerate(every):
        diff = [k for k in sorted(set(theirs) | set(every[0])) if theirs.get(k) != every[0].get(k)]
        if diff:
            shown = "; ".join(f"{k}: {_short(theirs.get(k))} there, {_short(every[0].get(k))} on rank 0" for k in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            live.stop_all(f"rank {r} on {live.nodes[r]} was launched with another plan or options than rank 0 on "
                          f"{live.nodes[0]}: {shown}{more}; launch every node with the same plan file and options")


class TorchrunEngine(Engine):
    """Rank 0's engine: same scheduler, steps go out by broadcast instead of queues."""

    local_ranks = False  # the ranks are spread over torchrun's nodes

    def _spawn(self) -> None:
        world = int(os.environ["WORLD_SIZE"])
        if world != self.world:
            from plans.errors import UserError

            raise UserError(f"plan {self.plan.name} needs {self.world} ranks; torchrun started {world}")
        self.runner, self.live = join(self.spec)
        self.to_encode: list[tuple[int, tuple]] = []
        self.lock_step, self.lanes = True, 1
        self.done: list[StepOut] = []  # this rank's own replica's answers

    def _send_encode(self, rank: int, job: tuple) -> None:
        self.to_encode.append((rank, job))  # goes out with the next step
        self._encoded(job[0])

    def _send(self, steps: dict[int, Step]) -> None:
        """One broadcast carries the round's steps and encode jobs; then this rank runs its own."""
        jobs, self.to_encode = self.to_encode, []
        with self.live.collectives():
            dist.broadcast_object_list([to_bytes((steps, jobs))], src=0)
            self.waiting = list(steps)
            mine = steps.get(self.runner.par.dp_i)
            if mine is not None:
                with self.live.awaiting(f"its own step {mine.step_id}"):
                    o = self.runner.run(mine)
                if o is not None:
                    self.done.append(o)
                    self.waiting.remove(o.replica)

    def _receive(self) -> StepOut:
        """This rank's own answer first, then each other replica's from its reporting rank."""
        if self.done:
            return self.done.pop(0)
        box: list[Any] = [None]
        rep = self.waiting.pop(0)
        src = reporting_rank(self.plan.mesh, rep)
        with self.live.collectives(), self.live.awaiting(f"replica {rep}'s answer from rank {src}"):
            dist.recv_object_list(box, src=src)
        return from_bytes(box[0])

    def shutdown(self, force: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with self.live.collectives():  # a rank found dead here still ends the run with its name
                dist.broadcast_object_list([None], src=0)
            self.live.stop()
            dist.destroy_process_group()
        except Exception:  # refused before joining, or the group is already gone
            pass


def follow(spec: WorkerSpec) -> None:
    """Ranks other than 0: serve steps until rank 0 broadcasts None."""
    runner, live = join(spec)
    with live.collectives():
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                break
            steps, jobs = from_bytes(box[0])
            if isinstance(runner, EncoderServer):
                for rank, job in jobs:
                    if rank == dist.get_rank():
                        runner.serve(*job)
                continue
            mine = steps.get(runner.par.dp_i)
            if mine is None:
                continue
            out = runner.run(mine)
            if out is not None:
                dist.send_object_list([to_bytes(out)], dst=0)
    live.stop()
    dist.destroy_process_group()
