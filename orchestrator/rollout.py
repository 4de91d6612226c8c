"""Rolling maintenance: drain each node in turn, run its maintenance step, uncordon it, go on.

`drainctl rollout NODE... --max-unavailable K --step-command CMD --wait` runs here, in the calling process, on
top of ordinary one-node drains (planner, queue, workers):

- the nodes are taken in the order given; each is drained by a drain of its own, cordoned when its turn
  comes (not all up front);
- each drain names the rollout's nodes still waiting for maintenance as last-resort targets
  (`DrainRequest.last_resort_targets`): a VM goes to a node already maintained or outside the rollout, and to a
  waiting node only when no other node has room, so it moves once per rollout where room allows;
- when a node is drained its step runs (`CMD` through the shell, `DRAIN_NODE` set to the node; exit 0 means the
  maintenance is done), then the node is uncordoned; meanwhile the next node is drained, unless its dry-run plan
  sends a VM to a node still waiting for maintenance while a step runs: then it waits for that step to end
  (a node maintained meanwhile takes its VMs), so each VM moves once where waiting makes room; `overlap`
  (`--overlap`) drains it at once instead (a shorter rollout, more migrations);
- at most K nodes are under maintenance at once (drained, step running, not yet uncordoned); the next node's
  drain runs beside them, so the node it empties stays in service until its own step may start;
- a drain that does not succeed or a step that fails stops the rollout: no further node is started, the
  steps already running finish, the failed node stays cordoned and the report names it.

A step may run again for the same node if the rollout is run again after a crash: the command must be
idempotent. The rollout itself is not kept in Redis: it lives as long as this process (hence `--wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.model import NODE_DRAIN_ANNOTATION, DrainPhase, DrainRequest, NodeName
from orchestrator.progress import Notice, follow
from orchestrator.service import DrainService


@dataclass
class NodeOutcome:
    node: str
    drain_id: str | None = None
    drain_phase: str | None = None
    step_exit: int | None = None
    uncordoned: bool = False
    problem: str | None = None

    @property
    def done(self) -> bool:
        return self.uncordoned and self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "drain_id": self.drain_id, "drain_phase": self.drain_phase,
                "step_exit": self.step_exit, "uncordoned": self.uncordoned, "problem": self.problem,
                "done": self.done}


@dataclass
class RolloutResult:
    nodes: list[NodeOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.nodes) and all(n.done for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "nodes": [n.to_json() for n in self.nodes]}


def check_rollout(nodes: Sequence[str], max_unavailable: int, step_command: str) -> str | None:
    """The problem with the rollout's arguments, or None."""
    if not nodes:
        return "NODES: name at least one node"
    twice = sorted({n for n in nodes if list(nodes).count(n) > 1})
    if twice:
        return f"NODES: listed more than once: {', '.join(twice)}"
    if max_unavailable < 1:
        return f"--max-unavailable: {max_unavailable} must be at least 1"
    if not step_command.strip():
        return "--step-command: must not be empty"
    return None


async def run_step(command: str, node: str) -> int:
    """Run the maintenance step for `node` through the shell with DRAIN_NODE set; its output goes to stderr."""
    proc = await asyncio.create_subprocess_shell(command, env={**os.environ, "DRAIN_NODE": node},
                                                 stdin=asyncio.subprocess.DEVNULL, stdout=2)
    return await proc.wait()


async def lands_on_waiting_nodes(service: DrainService, request: DrainRequest) -> bool:
    """Whether the dry-run plan of `request` sends a VM to one of its last-resort targets (a node the rollout
    maintains later). A refused plan says no here: the submit that follows reports it."""
    from orchestrator.planner import PlanError

    try:
        plan = await service.plan(request)
    except PlanError:
        return False
    waiting = set(request.last_resort_targets)
    return any(job.proposed_target in waiting for job in plan.jobs())


async def rollout(service: DrainService, nodes: Sequence[str], *, max_unavailable: int, step_command: str,
                  base: DrainRequest, notice: Notice, overlap: bool = False) -> RolloutResult:
    """Maintain `nodes` in order (see the module docstring). `base` carries the drain options (policy,
    attempts); its nodes are replaced by each node in turn. With `overlap`, the next node is drained during
    the maintenance of the previous ones even when its VMs must then go to nodes maintained later."""
    result = RolloutResult()
    maintaining: dict[asyncio.Task[None], NodeOutcome] = {}

    async def maintain(out: NodeOutcome) -> None:
        notice(f"{out.node}: drained; running the maintenance step")
        out.step_exit = await run_step(step_command, out.node)
        if out.step_exit != 0:
            out.problem = f"the maintenance step exited {out.step_exit}; the node stays cordoned"
            return
        await service.kube.cordon(out.node, unschedulable=False, annotations={NODE_DRAIN_ANNOTATION: None})
        out.uncordoned = True
        notice(f"{out.node}: maintained and uncordoned")

    async def reap(block_until_below: int) -> bool:
        """Wait until fewer than `block_until_below` steps run; False when one of them failed."""
        fine = True
        while maintaining and (len(maintaining) >= block_until_below
                               or any(t.done() for t in maintaining)):
            done, _ = await asyncio.wait(list(maintaining), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                out = maintaining.pop(task)
                exc = task.exception()
                if exc is not None:
                    out.problem = f"uncordon failed: {exc}"
                if out.problem:
                    fine = False
        return fine

    try:
        for i, node in enumerate(nodes):
            if not await reap(len(nodes) + 1):  # a step failed meanwhile: start no further node
                break
            out = NodeOutcome(node)
            result.nodes.append(out)
            request = dataclasses.replace(base, nodes=(NodeName(node),),
                                          last_resort_targets=tuple(NodeName(n) for n in nodes[i + 1:]))
            stopped = False
            while not overlap and maintaining and await lands_on_waiting_nodes(service, request):
                notice(f"{node}: waiting for a maintenance step to end: its VMs would otherwise go to nodes this "
                       "rollout maintains later, and move twice")
                if not await reap(len(maintaining)):
                    stopped = True
                    break
            if stopped:
                result.nodes.pop()
                break
            record, _created = await service.submit(request, source="rollout")
            out.drain_id = record.id
            notice(f"{node}: draining (drain {record.id})")
            followed = await follow(service, record.id, console=None, notice=notice)
            out.drain_phase = followed.view.drain.phase.value
            if followed.view.drain.phase is not DrainPhase.SUCCEEDED:
                out.problem = (f"drain {record.id} ended {out.drain_phase}: {followed.view.drain.message or ''}; "
                               "the node stays cordoned")
                break
            if not await reap(max_unavailable):
                out.problem = "drained, not maintained: the rollout stopped at a failed step; the node stays cordoned"
                break
            maintaining[asyncio.create_task(maintain(out))] = out
        await reap(1)
        started = {o.node for o in result.nodes}
        result.nodes += [NodeOutcome(n, problem="not started: the rollout stopped") for n in nodes
                         if n not in started]
    finally:
        for task in maintaining:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return result
