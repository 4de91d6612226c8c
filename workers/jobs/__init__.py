"""The arq job functions: plan a drain, migrate one VMI (one attempt), finish a node, advance, reconcile.

Every job is at-least-once and idempotent (DESIGN.md rules 2 and 3): job ids are deterministic
(`orchestrator.keys`), a re-run re-reads the drain records and the cluster, adopts the VMIM it finds instead
of creating another, and changes nothing twice. Level-based: `advance_drain` looks at the whole drain and
does what is missing (start the next nodes, enqueue a lost job, finish a node, close the drain), so any job's
end, a crash or the reconcile cron moves a drain forward the same way.

One module per job (arq's layout): `plan`, `advance`, `migrate`, `finish`, `reconcile`; `common` holds the
worker context, the enqueue helpers and the retry wrappers; `decisions` holds the engine's decisions as pure
functions (what to feed next, whether a migration timed out, what becomes of a VM after an attempt). The
rules the planner shares (memory, room, which pods to evict) are in `orchestrator.rules`. Time comes from the
injected clock (`ctx["clock"]`).

A job that fails in a way no retry can fix records the failure with its reason on the drain, node or VM and
moves the drain on (`common.guarded`), instead of leaving arq a failed job whose id it then refuses.
"""

from workers.jobs.advance import advance_drain, advance_job
from workers.jobs.common import Ctx
from workers.jobs.finish import finish_job
from workers.jobs.migrate import migrate_job
from workers.jobs.plan import dry_plan_job, plan_job
from workers.jobs.reconcile import reconcile_job

__all__ = ["Ctx", "advance_drain", "advance_job", "dry_plan_job", "finish_job", "migrate_job", "plan_job",
           "reconcile_job"]
