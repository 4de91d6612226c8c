"""The reconcile cron: advance every open drain and settle expired semaphore leases against the cluster."""

from __future__ import annotations

from orchestrator import kube as k
from orchestrator.model import FINAL_MIGRATION_PHASES
from workers.jobs.advance import advance_drain
from workers.jobs.common import Ctx, enqueue_migrate, log
from workers.jobs.ladder import clean_ended
from workers.jobs.tune import restore_orphaned


# ============================================================================================== reconcile
async def reconcile_job(ctx: Ctx) -> str:
    """Periodic: advance every open drain, and settle expired semaphore leases against the cluster."""
    store, sem, kube = ctx["store"], ctx["semaphore"], ctx["kube"]
    opened = 0
    for drain_id in await store.ids():
        drain = await store.find(drain_id)
        if drain is None or drain.phase.is_final:
            continue
        opened += 1
        await advance_drain(ctx, drain_id, ensure=True)
    if await restore_orphaned(ctx):
        log.info("reconcile.kubevirt_restored")
    if cleaned := await clean_ended(ctx):
        log.info("reconcile.ladder_cleaned", objects=cleaned)
    adopted = released = 0
    for info in await sem.expired():
        meta = dict(info.meta)
        vmim = meta.get("vmim", "")
        ns, _, name = vmim.partition("/")
        obj = await kube.find(k.VMIMS, name, ns) if name else None
        phase = ((obj or {}).get("status") or {}).get("phase")
        if obj is not None and phase not in FINAL_MIGRATION_PHASES:
            await sem.adopt(info.holder, expected_token=info.token)
            adopted += 1
        else:
            await sem.release(info.holder, token=info.token)
            released += 1
        m_drain, m_vmi, m_attempt = meta.get("drain_id"), meta.get("vmi"), meta.get("attempt")
        if m_drain and m_vmi and m_attempt:
            rec = await store.vm(m_drain, m_vmi)
            if rec is not None and not rec.phase.is_final and rec.attempt == int(m_attempt):
                await enqueue_migrate(ctx, m_drain, m_vmi, int(m_attempt))
    if adopted or released:
        log.info("reconcile.leases", adopted=adopted, released=released)
    return f"drains={opened} adopted={adopted} released={released}"

