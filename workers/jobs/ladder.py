"""The escalation ladder: what the next attempt of a VM judged unable to converge may try, and the cluster
objects that make it try that.

What it promises:
- `next_rung(vm, attempt, allowed)` (pure): the rung of attempt `attempt` of `vm`. The first attempt starts on
  the rung the plan expects the VM to need (`VmRecord.expected_rung`) where allowed, else plain. After an
  attempt aborted on a CannotConverge verdict: the next rung of the ladder (solo, auto-converge, post-copy)
  above the one that attempt ran on that `allowed` contains. After an attempt that failed for another reason
  (a target that failed, a timeout): the rung that attempt ran on again (the verdict that brought the VM
  there still stands). None: plain, or no allowed rung is left (then `hopeless(...)` says to stop).
- `hopeless(entry, allowed)` (pure): the report for an attempt judged unable to converge that no allowed rung
  above its own can help ("cannot converge: dirties X/s, the network carries Y/s", and what would make it
  move), or None. `escalates(entry, allowed)`: whether a rung follows it (the ladder's attempts do not count
  against max_attempts).
- `vm_rungs(...)`: the rungs one VM may use, from the drain's request and the `drainctl.io/escalation`
  annotations of its VMI and namespace (orchestrator.escalation), read when the VM needs them only.
- Solo: no cluster object; the migrate job takes the whole of its source node's and its target's inbound
  semaphore scopes (workers.semaphore weights), so no other migration of ours runs from or to those NICs.
- `apply_rung(...)` creates the attempt's MigrationPolicy for auto-converge and post-copy (cluster-scoped, named
  like the VMIM, labelled with the drain id) and puts its selector labels on the VMI; `release_rung(...)`
  removes both. The selector has more labels than any other policy in the cluster has selectors, so KubeVirt's
  matchPolicy (the policy with the most matching labels wins) picks it over a user's policy that also matches.
- Auto-converge: `allowAutoConverge: true`: QEMU throttles the guest's vCPUs step by step until it converges.
- Post-copy: `allowPostCopy: true` with a small `completionTimeoutPerGiB`: KubeVirt switches a migration to
  post-copy only when its completion timeout passes (virt-launcher's migration monitor).
- `clean_ended(ctx)` removes every policy and VMI label of drains that ended (the reconciler calls it, so a
  crash between apply and release leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import hashlib

from orchestrator import kube as k
from orchestrator.escalation import ESCALATION_ANNOTATION, LADDER, Rung, allowed_rungs
from orchestrator.model import DRAIN_ID_LABEL, format_bytes
from orchestrator.records import AttemptRecord, DrainRecord, VmRecord
from workers.jobs.common import Ctx, Obj, log

__all__ = ["POST_COPY_TIMEOUT_PER_GIB", "RUNG_LABEL_PREFIX", "Rung", "apply_rung", "clean_ended", "escalates",
           "hopeless", "needs_policy", "next_rung", "release_rung", "vm_rungs"]

RUNG_LABEL_PREFIX = "rung.drainctl.io/"
"""Prefix of the labels drainctl puts on a VMI for one attempt's MigrationPolicy (its selector, and the drain)."""
VMI_DRAIN_ID_LABEL = f"{RUNG_LABEL_PREFIX}drain-id"
POST_COPY_TIMEOUT_PER_GIB = 1
"""Seconds per GiB before KubeVirt switches the escalated migration to post-copy: at once, in effect."""
CANNOT_CONVERGE = "CannotConverge"


def needs_policy(rung: Rung | None) -> bool:
    """Whether the rung works through a drain-owned MigrationPolicy (solo works through the semaphore)."""
    return rung in (Rung.AUTO_CONVERGE, Rung.POST_COPY)


def _above(rung: str | None, allowed: frozenset[Rung]) -> Rung | None:
    start = 0 if rung is None else LADDER.index(Rung(rung)) + 1
    return next((r for r in LADDER[start:] if r in allowed), None)


def next_rung(vm: VmRecord, attempt: int, allowed: frozenset[Rung]) -> Rung | None:
    previous = vm.attempt_entry(attempt - 1)
    if previous is None:
        # The first attempt: plain, or the rung the plan expects the VM to need where it is allowed (a VM whose
        # last known dirty rate no plain attempt carries is not made to fail one first).
        expected = Rung(vm.expected_rung) if vm.expected_rung in {r.value for r in LADDER} else None
        return expected if expected in allowed else None
    if previous.convergence != CANNOT_CONVERGE:
        again = None if previous.rung is None else Rung(previous.rung)
        return again if again in allowed else None
    return _above(previous.rung, allowed)


def escalates(entry: AttemptRecord, allowed: frozenset[Rung]) -> bool:
    return entry.convergence == CANNOT_CONVERGE and _above(entry.rung, allowed) is not None


def hopeless(entry: AttemptRecord, allowed: frozenset[Rung], *, problem: str | None = None) -> str | None:
    if entry.convergence != CANNOT_CONVERGE or _above(entry.rung, allowed) is not None:
        return None
    dirty = f"{format_bytes(int(entry.dirty_rate or 0))}/s"
    carried = f"{format_bytes(int(entry.transfer_rate or 0))}/s"
    tried = LADDER[: LADDER.index(Rung(entry.rung)) + 1] if entry.rung else ()
    remedies = [f"a network that carries more than {dirty} for it (a dedicated migration network)",
                "a quieter time for the guest"]
    untried = [r for r in LADDER if r not in tried and r not in allowed]
    hints = {Rung.SOLO: "its NICs to itself (--escalation solo)",
             Rung.AUTO_CONVERGE: "CPU throttling (--escalation auto-converge)",
             Rung.POST_COPY: "post-copy (drainctl drain --allow-post-copy)"}
    remedies += [hints[r] for r in untried]
    ran = f" on the {entry.rung} rung" if entry.rung else ""
    text = f"cannot converge{ran}: dirties {dirty}, the network carries {carried}; it would move with " + \
        ", ".join(remedies[:-1]) + f" or {remedies[-1]}"
    if problem:
        text += f" ({problem})"
    elif untried:
        text += f" (rungs allowed for it: {', '.join(r.option for r in LADDER if r in allowed) or 'none'})"
    return text


async def vm_rungs(ctx: Ctx, drain: DrainRecord, namespace: str, name: str) -> tuple[frozenset[Rung], str | None]:
    """The rungs this VM may use, and the problem with its annotations (then no rung is allowed)."""
    kube = ctx["kube"]
    vmi = await kube.find(k.VMIS, name, namespace)
    ns = await kube.find(k.NAMESPACES, namespace)

    def note(obj: Obj | None) -> str | None:
        value = (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(ESCALATION_ANNOTATION)
        return None if value is None else str(value)

    try:
        return allowed_rungs(drain.escalation, allow_post_copy=drain.allow_post_copy,
                             namespace_annotation=note(ns), vmi_annotation=note(vmi), namespace=namespace,
                             vmi=f"{namespace}/{name}"), None
    except ValueError as exc:
        return frozenset(), str(exc)


def _selector(policy_name: str, others: list[Obj]) -> dict[str, str]:
    """More labels than any other policy selects on, each unique to this policy."""
    most = max((len((p.get("spec") or {}).get("selectors", {}).get("virtualMachineInstanceSelector") or {})
                + len((p.get("spec") or {}).get("selectors", {}).get("namespaceSelector") or {})
                for p in others), default=0)
    value = hashlib.sha256(policy_name.encode()).hexdigest()[:16]
    return {f"{RUNG_LABEL_PREFIX}{i}": value for i in range(max(2, most + 1))}


async def apply_rung(ctx: Ctx, *, drain_id: str, namespace: str, name: str, policy_name: str,
                     rung: Rung) -> None:
    kube = ctx["kube"]
    policies, _ = await kube.list(k.MIGRATION_POLICIES)
    others = [p for p in policies if p["metadata"]["name"] != policy_name]
    selector = _selector(policy_name, others)
    spec: Obj = {"selectors": {"virtualMachineInstanceSelector": selector}}
    if rung is Rung.AUTO_CONVERGE:
        spec.update(allowAutoConverge=True)
    elif rung is Rung.POST_COPY:
        spec.update(allowPostCopy=True, completionTimeoutPerGiB=POST_COPY_TIMEOUT_PER_GIB)
    body = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": policy_name, "labels": {DRAIN_ID_LABEL: drain_id}}, "spec": spec}
    try:
        await kube.create(k.MIGRATION_POLICIES, body)
    except k.AlreadyExists:
        current = await kube.get(k.MIGRATION_POLICIES, policy_name)
        selector = dict((current.get("spec") or {}).get("selectors", {}).get("virtualMachineInstanceSelector") or {})
    await kube.patch(k.VMIS, name, {"metadata": {"labels": {**selector, VMI_DRAIN_ID_LABEL: drain_id}}}, namespace)
    log.info("ladder.applied", drain_id=drain_id, vmi=f"{namespace}/{name}", policy=policy_name, rung=rung.value)


async def release_rung(ctx: Ctx, *, namespace: str, name: str, policy_name: str | None) -> None:
    kube = ctx["kube"]
    vmi = await kube.find(k.VMIS, name, namespace)
    labels = ((vmi or {}).get("metadata") or {}).get("labels") or {}
    drop: dict[str, str | None] = {key: None for key in labels if key.startswith(RUNG_LABEL_PREFIX)}
    if drop:
        with contextlib.suppress(k.NotFound):
            await kube.patch(k.VMIS, name, {"metadata": {"labels": drop}}, namespace)
    if policy_name:
        await kube.delete(k.MIGRATION_POLICIES, policy_name)


async def clean_ended(ctx: Ctx) -> int:
    """Remove every MigrationPolicy and VMI label drainctl made for a drain that has ended (or that Redis no
    longer knows); the number of objects cleaned. The reconciler runs it: a crash leaves nothing behind."""
    kube, store = ctx["kube"], ctx["store"]
    ended: dict[str, bool] = {}

    async def is_ended(drain_id: str) -> bool:
        if drain_id not in ended:
            drain = await store.find(drain_id)
            ended[drain_id] = drain is None or drain.phase.is_final
        return ended[drain_id]

    cleaned = 0
    policies, _ = await kube.list(k.MIGRATION_POLICIES, label_selector=DRAIN_ID_LABEL)
    for policy in policies:
        if await is_ended(policy["metadata"]["labels"][DRAIN_ID_LABEL]):
            await kube.delete(k.MIGRATION_POLICIES, policy["metadata"]["name"])
            cleaned += 1
    vmis, _ = await kube.list(k.VMIS, label_selector=VMI_DRAIN_ID_LABEL)
    for vmi in vmis:
        meta = vmi["metadata"]
        if await is_ended(meta["labels"][VMI_DRAIN_ID_LABEL]):
            await release_rung(ctx, namespace=meta["namespace"], name=meta["name"], policy_name=None)
            cleaned += 1
    return cleaned
