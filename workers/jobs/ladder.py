"""The escalation ladder: what the next attempt of a VM judged unable to converge may try, and the cluster
objects that make it try that.

What it promises:
- `next_rung(vm, attempt, allow_post_copy=...)` (pure): the rung of attempt `attempt` of `vm`. A plain
  attempt unless the previous one was aborted on a CannotConverge verdict; then post-copy where the drain
  allows it (`allow_post_copy`), else None and `hopeless(...)` says to stop.
- `hopeless(entry, allow_post_copy=...)` (pure): the report for an attempt judged unable to converge that no
  allowed rung can help ("cannot converge: dirties X/s, the network carries Y/s", and what would make it
  move), or None.
- `apply_rung(...)` creates the attempt's MigrationPolicy (cluster-scoped, named like the VMIM, labelled with
  the drain id) and puts its selector labels on the VMI; `release_rung(...)` removes both. The selector has
  more labels than any other policy in the cluster has selectors, so KubeVirt's matchPolicy (the policy with
  the most matching labels wins) picks it over a user's policy that also matches the VMI.
- Post-copy: `allowPostCopy: true` with a small `completionTimeoutPerGiB`: KubeVirt switches a migration to
  post-copy only when its completion timeout passes (virt-launcher's migration monitor).
- `clean_ended(ctx)` removes every policy and VMI label of drains that ended (the reconciler calls it, so a
  crash between apply and release leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib

from orchestrator import kube as k
from orchestrator.model import DRAIN_ID_LABEL, format_bytes
from orchestrator.records import AttemptRecord, VmRecord
from workers.jobs.common import Ctx, Obj, log

__all__ = ["POST_COPY_TIMEOUT_PER_GIB", "RUNG_LABEL_PREFIX", "Rung", "apply_rung", "clean_ended", "hopeless",
           "next_rung", "release_rung"]

RUNG_LABEL_PREFIX = "rung.drainctl.io/"
"""Prefix of the labels drainctl puts on a VMI for one attempt's MigrationPolicy (its selector, and the drain)."""
VMI_DRAIN_ID_LABEL = f"{RUNG_LABEL_PREFIX}drain-id"
POST_COPY_TIMEOUT_PER_GIB = 1
"""Seconds per GiB before KubeVirt switches the escalated migration to post-copy: at once, in effect."""
CANNOT_CONVERGE = "CannotConverge"


class Rung(enum.StrEnum):
    POST_COPY = "PostCopy"


def next_rung(vm: VmRecord, attempt: int, *, allow_post_copy: bool) -> Rung | None:
    previous = vm.attempt_entry(attempt - 1)
    if previous is None or previous.convergence != CANNOT_CONVERGE:
        return None
    return Rung.POST_COPY if allow_post_copy else None


def hopeless(entry: AttemptRecord, *, allow_post_copy: bool) -> str | None:
    if entry.convergence != CANNOT_CONVERGE or (allow_post_copy and entry.rung is None):
        return None
    dirty = f"{format_bytes(int(entry.dirty_rate or 0))}/s"
    carried = f"{format_bytes(int(entry.transfer_rate or 0))}/s"
    remedies = "a quieter time for the guest, a dedicated migration network"
    if not allow_post_copy:
        remedies += ", or post-copy (drainctl drain --allow-post-copy)"
    return f"cannot converge: dirties {dirty}, the network carries {carried}; it would move with {remedies}"


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
    if rung is Rung.POST_COPY:
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
