"""KubeVirt's migration limits tuned for a drain's window (`drain --tune`), and put back when it ends.

What it promises
----------------
* Before the first change to `KubeVirt.spec.configuration.migrations`, the values in force are stored in
  Redis under one key (`keys.TUNE_KEY`) with the id of the drain that tuned them. Only one drain tunes at a
  time (KubeVirt's settings are cluster-wide): a second tuned drain is refused with the first one's id.
* The drain's end (`close_drain`) puts the stored values back before the drain record turns final, so a
  failure there is retried; the reconciler restores for any drain that is final or gone (a worker killed
  between the two, an expired record). The stored key is removed only after the restore succeeded.
* Migrations KubeVirt already handed off keep the options they started with (virt-handler copies them into
  `vmi.status.migrationState.migrationConfiguration`); the new limits apply to migrations admitted later.

It does not undo changes an operator makes to those fields meanwhile: the restore writes the stored values.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator import keys
from orchestrator import kube as k
from workers.jobs.common import Ctx, log

TUNED_FIELDS = ("parallelMigrationsPerCluster", "parallelOutboundMigrationsPerNode", "bandwidthPerMigration")


class TuneConflict(Exception):
    """The settings cannot be tuned for this drain: another open drain has them tuned, or there is no KubeVirt
    resource."""


def tuned_values(tuning: dict[str, Any]) -> dict[str, Any]:
    """The `spec.configuration.migrations` fields a plan's tuning sets (bandwidth 0 = unlimited: unset)."""
    bandwidth = int(tuning["bandwidth_per_migration_bytes"])
    return {"parallelMigrationsPerCluster": int(tuning["parallel_per_cluster"]),
            "parallelOutboundMigrationsPerNode": int(tuning["parallel_outbound_per_node"]),
            "bandwidthPerMigration": str(bandwidth) if bandwidth > 0 else None}


async def _kubevirt(ctx: Ctx) -> dict[str, Any]:
    items, _ = await ctx["kube"].list(k.KUBEVIRTS)
    if not items:
        raise TuneConflict("no KubeVirt resource in the cluster: cannot tune its migration settings")
    obj: dict[str, Any] = items[0]
    return obj


async def apply_tuning(ctx: Ctx, drain_id: str, values: dict[str, Any]) -> None:
    """Store what is in force (once per drain), then set `values`. Raises TuneConflict if another drain has
    the settings tuned."""
    redis = ctx["redis"]
    kv = await _kubevirt(ctx)
    meta = kv["metadata"]
    current = ((kv.get("spec") or {}).get("configuration") or {}).get("migrations") or {}
    saved = {"drain_id": drain_id, "namespace": meta.get("namespace"), "name": meta["name"],
             "migrations": {f: current.get(f) for f in TUNED_FIELDS}}
    if not await redis.set(keys.TUNE_KEY, json.dumps(saved), nx=True):
        raw = await redis.get(keys.TUNE_KEY)
        owner = json.loads(raw)["drain_id"] if raw else None
        if owner != drain_id:
            raise TuneConflict(f"drain {owner} has KubeVirt's migration settings tuned; only one drain tunes "
                               "them at a time")
    await ctx["kube"].patch(k.KUBEVIRTS, meta["name"], {"spec": {"configuration": {"migrations": values}}},
                            meta.get("namespace"))
    await ctx["store"].emit(drain_id, "kubevirt.tuned", migrations=values)
    log.info("kubevirt.tuned", drain_id=drain_id, migrations=values)


async def restore_tuning(ctx: Ctx, drain_id: str | None = None) -> bool:
    """Put the stored values back (only those of `drain_id`, if given) and forget them; False if there was
    nothing to restore."""
    redis = ctx["redis"]
    raw = await redis.get(keys.TUNE_KEY)
    if raw is None:
        return False
    saved = json.loads(raw)
    if drain_id is not None and saved["drain_id"] != drain_id:
        return False
    await ctx["kube"].patch(k.KUBEVIRTS, saved["name"],
                            {"spec": {"configuration": {"migrations": saved["migrations"]}}}, saved["namespace"])
    # Delete only the key we read: a new tuned drain may have stored its own meanwhile (it cannot, while
    # this one exists, but a restore racing a restore must not delete the next drain's originals).
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.TUNE_KEY)
        if await pipe.get(keys.TUNE_KEY) == raw:
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(keys.TUNE_KEY)
            await pipe.execute()
    await ctx["store"].emit(saved["drain_id"], "kubevirt.restored", migrations=saved["migrations"])
    log.info("kubevirt.restored", drain_id=saved["drain_id"], migrations=saved["migrations"])
    return True


async def restore_orphaned(ctx: Ctx) -> bool:
    """The reconciler's part: restore when the drain that tuned is final or gone."""
    raw = await ctx["redis"].get(keys.TUNE_KEY)
    if raw is None:
        return False
    owner = json.loads(raw)["drain_id"]
    drain = await ctx["store"].find(owner)
    if drain is not None and not drain.phase.is_final:
        return False
    return await restore_tuning(ctx, owner)
