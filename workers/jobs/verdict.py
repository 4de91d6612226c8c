"""The convergence verdict inside the migrate job: look at a running pre-copy's metrics now and then, judge
it (orchestrator.convergence.judge) and say when to abort it.

What it promises: `VerdictWatch.check()` returns an `Abort` (class NOT_CONVERGING, the numbers in its reason)
once the verdict is CannotConverge, so the job deletes the VMIM at most one look (`CHECK_EVERY_S` cluster
seconds) after the evidence is in, instead of holding its slot for KubeVirt's whole completion budget. Each
change of verdict is written on the attempt record (verdict, dirty rate, transfer rate) and emitted as a
`migration.verdict` event. Without Prometheus (no URL, unreachable) it never aborts: the job's timeouts rule
as before. A migration KubeVirt may switch to post-copy (allowPostCopy in its migration configuration, or
already in post-copy) is never aborted for not converging: post-copy is how it converges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator import kube as k
from orchestrator.convergence import Convergence, Verdict, judge
from orchestrator.model import FailureClass
from orchestrator.records import VmRecord
from workers.jobs.common import Ctx
from workers.jobs.decisions import Abort

__all__ = ["CHECK_EVERY_S", "HISTORY_WINDOW_S", "VerdictWatch"]

CHECK_EVERY_S = 10.0
"""Cluster seconds between two looks at a running migration's metrics (two Prometheus queries each)."""
HISTORY_WINDOW_S = 60.0
"""Cluster seconds of samples each look judges: enough for a measured round plus the 30 s of evidence, short
enough that a change of the bandwidth share minutes ago (another migration ended) does not hold the verdict."""


@dataclass
class VerdictWatch:
    ctx: Ctx
    drain_id: str
    vmi: str
    namespace: str
    name: str
    attempt: int
    _next_at: float = 0.0
    _config: dict[str, Any] | None = None
    _last: Convergence | None = field(default=None)

    def wake_s(self, phase: str) -> float:
        """Wall seconds the job may wait for a VMIM change before its next look (1 s without metrics to judge)."""
        reader = self.ctx.get("prometheus")
        if phase != "Running" or reader is None or not reader.enabled:
            return 1.0
        return max(0.05, min(1.0, self.ctx["settings"].to_wall(CHECK_EVERY_S)))

    async def check(self) -> Abort | None:
        """Judge the running migration if a look is due; an Abort when it cannot converge."""
        reader = self.ctx.get("prometheus")
        if reader is None or not reader.enabled:
            return None
        clock = self.ctx["clock"]
        if clock.now() < self._next_at:
            return None
        self._next_at = clock.now() + CHECK_EVERY_S
        config = await self._migration_config()
        if config is None or config.get("allowPostCopy") or config.get("mode") == "PostCopy":
            return None
        now = (await reader.read(namespace=self.namespace)).get((self.namespace, self.name))
        if now is None:
            return None
        history = await reader.history(self.namespace, self.name, end=now.at, window_s=HISTORY_WINDOW_S)
        if history is None:
            return None
        verdict = judge(history.samples(), auto_converge=bool(config.get("allowAutoConverge")))
        await self._note(verdict, at=now.at)
        if verdict.convergence is Convergence.CANNOT_CONVERGE:
            return Abort(f"aborted by drainctl: {verdict.reason}", FailureClass.NOT_CONVERGING)
        return None

    async def _migration_config(self) -> dict[str, Any] | None:
        """The VMI's migration configuration as KubeVirt resolved it for this migration (policies applied),
        with its mode; read once per migration, the mode again while it may still switch."""
        if self._config is not None and not self._config.get("allowPostCopy"):
            return self._config
        vmi = await self.ctx["kube"].find(k.VMIS, self.name, self.namespace)
        state = ((vmi or {}).get("status") or {}).get("migrationState") or {}
        config = state.get("migrationConfiguration")
        if not isinstance(config, dict):
            return None
        self._config = {**config, "mode": state.get("mode")}
        return self._config

    async def _note(self, verdict: Verdict, *, at: float) -> None:
        if verdict.convergence is self._last or verdict.convergence is Convergence.UNKNOWN:
            return
        self._last = verdict.convergence
        store = self.ctx["store"]

        def put(vm: VmRecord) -> None:
            entry = vm.attempt_entry(self.attempt)
            if entry is None:
                return
            vm.put_attempt(entry.model_copy(update={
                "convergence": verdict.convergence.value, "convergence_reason": verdict.reason,
                "dirty_rate": verdict.dirty_rate, "transfer_rate": verdict.transfer_rate,
                "judged_at": at}))
            if verdict.convergence is Convergence.CANNOT_CONVERGE:
                vm.message = verdict.reason

        await store.update_vm(self.drain_id, self.vmi, put)
        await store.emit(self.drain_id, "migration.verdict", vmi=self.vmi, attempt=self.attempt,
                         convergence=verdict.convergence.value, reason=verdict.reason,
                         dirty_rate=verdict.dirty_rate, transfer_rate=verdict.transfer_rate)
