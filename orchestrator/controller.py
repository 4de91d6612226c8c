"""The DrainRequest controller: `drainctl.io/v1alpha1` DrainRequest objects drive drains.

Promises:
- A new DrainRequest starts exactly one drain through `DrainService.submit`, with the object's uid as the
  idempotency key: a controller restart, a second replica or a replayed watch event finds the same drain.
- Its status mirrors the drain (phase, drainId, message, per-node phases, VM counts) until the drain is
  final; a spec the drain request model refuses, or a drain the planner refuses, ends as phase Failed with
  the reason in `status.message`; nodes held by another drain leave it Pending, retried until they are free.
- Deleting a DrainRequest whose drain is still open cancels that drain. A finalizer
  (`drainctl.io/cancel-drain`) makes this hold even when the deletion happens while no controller runs.
- With several replicas only one acts: leader election on a `coordination.k8s.io/v1` Lease (holderIdentity,
  leaseDurationSeconds, acquireTime, renewTime, leaseTransitions), with client-go's rules: a lease held by
  someone else is taken over only after it went unrenewed for leaseDurationSeconds as measured by our own
  monotonic clock (no trust in other machines' clocks), every write is guarded by the resourceVersion read,
  and a leader that cannot renew in time stops acting before its lease could be taken.

Level-based: each pass re-reads the watch-fed cache and the drain store and writes only what differs, so a
missed event costs at most one resync period. Start it with ``run_controller(service, kube, identity=...,
stop=event)`` beside the HTTP API; it returns after `stop` is set, releasing the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import DrainPhase, DrainRequest, VmPhase, VmVerdict
from orchestrator.planner import PlanError
from orchestrator.service import DrainService, IdempotencyKeyReused, NodeConflict
from orchestrator.store import DrainNotFound, DrainView

log = structlog.get_logger("orchestrator.controller")

Obj = dict[str, Any]
FINALIZER = "drainctl.io/cancel-drain"
LEASE_NAME = "drainctl-controller"
SOURCE = "drainrequest"
SPEC_FIELDS = {"nodes": "nodes", "maxParallelNodes": "max_parallel_nodes", "order": "order",
               "nonMigratable": "non_migratable", "maxAttempts": "max_attempts"}
"""DrainRequest spec field -> DrainRequest (model) field."""
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class _StatusOf(k.Kind):
    """The /status subresource of a kind: on a resource with a status subresource, only writes there change
    status (the API server drops status from writes to the main resource)."""

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        return super().path(namespace, name, "status")


def status_subresource(kind: k.Kind) -> k.Kind:
    return _StatusOf(kind.plural, kind.group, kind.version, kind.namespaced)


DRAINREQUEST_STATUS = status_subresource(k.DRAINREQUESTS)


def micro_time(at: float | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds), as Lease acquireTime and renewTime want."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(at: Any) -> str | None:
    if not isinstance(at, int | float):
        return None
    return datetime.fromtimestamp(float(at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_namespace() -> str:
    """Where the lease lives: $POD_NAMESPACE, the pod's service-account namespace, else "default"."""
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    with contextlib.suppress(OSError):
        text = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        if text:
            return text
    return "default"


def default_identity() -> str:
    """Pod name (the hostname in a pod) plus the process id: unique per replica and per restart."""
    return f"{socket.gethostname()}_{os.getpid()}"


# ============================================================================================ leader election
class LeaderElector:
    """Acquire, renew and release one Lease. Not a task: the caller decides when to call `try_acquire_or_renew`."""

    def __init__(self, kube: k.Kube, *, identity: str, namespace: str, name: str = LEASE_NAME,
                 lease_duration_s: float = 15.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.identity = identity
        self.namespace = namespace
        self.name = name
        self.lease_duration_s = lease_duration_s
        self._monotonic = monotonic
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.last_renewed: float | None = None
        """Our monotonic time of the last successful acquire or renew."""

    @property
    def is_leader(self) -> bool:
        """Whether our last renew is recent enough that no one else may have taken the lease yet."""
        return self.last_renewed is not None and self._monotonic() - self.last_renewed < self.lease_duration_s

    async def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew. Returns whether we hold the lease now."""
        now = self._monotonic()
        obj = await self.kube.find(k.LEASES, self.name, self.namespace)
        stamp = micro_time()
        duration = max(1, round(self.lease_duration_s))
        if obj is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                             "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}}
            try:
                await self.kube.create(k.LEASES, body, self.namespace)
            except (k.AlreadyExists, k.Conflict):
                return False
            self._won(now, fresh=True)
            return True
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, spec.get("renewTime"), meta.get("resourceVersion"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, now
        theirs = holder and holder != self.identity
        their_duration = float(spec.get("leaseDurationSeconds") or duration)
        if theirs and now - self._observed_at < their_duration:
            self.last_renewed = None
            return False
        patch: Obj = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                      "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                               "renewTime": stamp}}
        if holder != self.identity:
            patch["spec"]["acquireTime"] = stamp
            patch["spec"]["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            await self.kube.patch(k.LEASES, self.name, patch, self.namespace)
        except (k.Conflict, k.NotFound):
            return False
        self._won(now, fresh=holder != self.identity)
        return True

    def _won(self, now: float, *, fresh: bool) -> None:
        if fresh or self.last_renewed is None:
            log.info("leader.acquired", identity=self.identity, lease=f"{self.namespace}/{self.name}")
        self.last_renewed = now

    async def release(self) -> None:
        """Give the lease up (if still ours) so another replica takes over at once instead of after expiry."""
        if self.last_renewed is None:
            return
        self.last_renewed = None
        obj = await self.kube.find(k.LEASES, self.name, self.namespace)
        if obj is None or (obj.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                 "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": micro_time()}}
        with contextlib.suppress(k.Conflict, k.NotFound):
            await self.kube.patch(k.LEASES, self.name, patch, self.namespace)
        log.info("leader.released", identity=self.identity)


# ============================================================================================== reconcile
def request_from_spec(spec: Obj) -> DrainRequest:
    """The drain request a DrainRequest spec asks for; ValueError names the spec field and the problem."""
    if not isinstance(spec, dict):
        raise ValueError("spec: expected an object")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"spec: unknown field(s) {', '.join(unknown)}")
    body = {SPEC_FIELDS[name]: value for name, value in spec.items() if value is not None}
    try:
        return DrainRequest.from_json(body)
    except ValueError as exc:
        text = str(exc).removeprefix("drain request: ")
        for camel, snake in SPEC_FIELDS.items():
            if text.startswith(f"{snake}:"):
                text = f"{camel}:{text[len(snake) + 1:]}"
        raise ValueError(f"spec.{text}") from None


def status_from_view(view: DrainView, *, generation: int | None) -> Obj:
    """The DrainRequest status that mirrors one drain."""
    drain = view.drain
    nodes = []
    for node in view.nodes_in_order():
        mine = view.vms_on(node.node)
        nodes.append({"name": node.node, "phase": node.phase.value, "message": node.message or "",
                      "vms": len(mine), "migrated": sum(1 for vm in mine if vm.phase is VmPhase.SUCCEEDED),
                      "failed": sum(1 for vm in mine if vm.phase is VmPhase.FAILED)})
    to_move = [vm for vm in view.vms.values() if vm.verdict is VmVerdict.MIGRATE]
    done = sum(1 for vm in to_move if vm.phase is VmPhase.SUCCEEDED)
    status: Obj = {
        "phase": drain.phase.value, "drainId": drain.id, "message": drain.message or "",
        "nodes": nodes,
        "progress": f"{done}/{len(to_move)} VMs",
        "vms": {"total": len(view.vms), "migrated": done,
                "failed": sum(1 for vm in view.vms.values() if vm.phase is VmPhase.FAILED),
                "open": sum(1 for vm in view.vms.values() if not vm.phase.is_final)},
        "startedAt": _rfc3339(drain.started_at), "finishedAt": _rfc3339(drain.finished_at),
    }
    if drain.estimate_s is not None:
        status["estimateSeconds"] = round(drain.estimate_s)
    if generation is not None:
        status["observedGeneration"] = generation
    return status


class DrainRequestController:
    """Reconciles every DrainRequest in the cluster against the drain store. Run `run()` while leader."""

    def __init__(self, service: DrainService, kube: k.Kube, *, resync_s: float = 1.0) -> None:
        self.service = service
        self.kube = kube
        self.resync_s = resync_s
        self.cache: dict[str, Obj] = {}
        self.deleted: dict[str, Obj] = {}
        self.conflict_retry_s = 10.0
        self._not_before: dict[str, float] = {}
        """uid -> monotonic time before which a DrainRequest waiting for busy nodes is not submitted again."""
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()

    # ------------------------------------------------------------------------------------------- watch
    async def _on_list(self, items: list[Obj]) -> None:
        fresh = {o["metadata"]["uid"]: o for o in items}
        for uid, obj in self.cache.items():
            if uid not in fresh:
                self.deleted[uid] = obj
        self.cache = fresh
        self._synced.set()
        self._wake.set()

    async def _on_event(self, etype: str, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        if etype == "DELETED":
            self.cache.pop(uid, None)
            self.deleted[uid] = obj
        else:
            self.cache[uid] = obj
        self._wake.set()

    async def _watch(self) -> None:
        while True:
            try:
                await self.kube.watch(k.DRAINREQUESTS, on_list=self._on_list, on_event=self._on_event)
            except k.NotFound:
                log.warning("drainrequests.crd_missing", hint="kubectl apply -f k8s/crd-drainrequest.yaml")
                await asyncio.sleep(10.0)

    # ------------------------------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Watch and reconcile until cancelled."""
        watch = asyncio.create_task(self._watch(), name="drainrequest-watch")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_s):
                        await self._wake.wait()
                self._wake.clear()
                if watch.done():
                    watch.result()
                if self._synced.is_set():
                    await self.reconcile_all()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def reconcile_all(self) -> None:
        for uid, obj in list(self.deleted.items()):
            await self._guard(obj, self.on_deleted)
            self.deleted.pop(uid, None)
        for obj in list(self.cache.values()):
            await self._guard(obj, self.reconcile)

    async def _guard(self, obj: Obj, step: Callable[[Obj], Any]) -> None:
        """One object's failure (cluster or Redis unavailable) must not stop the others; the next pass retries."""
        meta = obj.get("metadata") or {}
        try:
            await step(obj)
        except (k.KubeError, OSError, ConnectionError) as exc:
            log.warning("drainrequest.retry", name=meta.get("name"), namespace=meta.get("namespace"),
                        error=str(exc))

    async def _drain_id(self, obj: Obj) -> str | None:
        found = (obj.get("status") or {}).get("drainId")
        if found:
            return str(found)
        raw = await self.service.store.redis.get(keys.idempotency_key(obj["metadata"]["uid"]))
        return None if raw is None else (raw.decode() if isinstance(raw, bytes) else str(raw))

    async def _cancel(self, obj: Obj) -> None:
        drain_id = await self._drain_id(obj)
        if drain_id is None:
            return
        try:
            record = await self.service.cancel(drain_id)
        except DrainNotFound:
            return
        meta = obj["metadata"]
        log.info("drainrequest.cancelled", name=meta.get("name"), namespace=meta.get("namespace"),
                 drain_id=drain_id, phase=record.phase.value)

    async def on_deleted(self, obj: Obj) -> None:
        await self._cancel(obj)

    async def reconcile(self, obj: Obj) -> None:
        meta = obj["metadata"]
        name, ns = meta["name"], meta.get("namespace") or "default"
        status = obj.get("status") or {}
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers:
                await self._cancel(obj)
                await self._write_meta(obj, finalizers=[f for f in finalizers if f != FINALIZER])
            return
        final = status.get("phase") in {p.value for p in DrainPhase if p.is_final}
        if final and not status.get("drainId"):
            return  # refused or invalid: nothing runs, nothing to mirror
        if not final and FINALIZER not in finalizers:
            obj = await self._write_meta(obj, finalizers=[*finalizers, FINALIZER])
        drain_id = status.get("drainId")
        if not drain_id:
            await self._submit(obj)
            return
        if final:
            return
        try:
            view = await self.service.get(str(drain_id))
        except DrainNotFound:
            await self._set_status(obj, {"phase": DrainPhase.FAILED.value, "drainId": drain_id,
                                         "message": f"drain {drain_id} is no longer recorded in Redis"})
            return
        await self._set_status(obj, status_from_view(view, generation=meta.get("generation")))
        log.debug("drainrequest.synced", name=name, namespace=ns, drain_id=drain_id, phase=view.drain.phase.value)

    async def _submit(self, obj: Obj) -> None:
        meta = obj["metadata"]
        generation = meta.get("generation")
        if time.monotonic() < self._not_before.get(meta["uid"], 0.0):
            return
        try:
            request = request_from_spec(obj.get("spec") or {})
        except ValueError as exc:
            await self._set_status(obj, {"phase": DrainPhase.FAILED.value, "message": f"invalid: {exc}",
                                         "observedGeneration": generation})
            return
        try:
            record, created = await self.service.submit(request, idempotency_key=meta["uid"], source=SOURCE)
        except PlanError as exc:
            await self._set_status(obj, {"phase": DrainPhase.FAILED.value, "observedGeneration": generation,
                                         "message": "refused by the planner: " + "; ".join(exc.problems)})
            return
        except NodeConflict as exc:
            # Submitting plans against a fresh snapshot first; retrying that every pass would hammer the API.
            self._not_before[meta["uid"]] = time.monotonic() + self.conflict_retry_s
            await self._set_status(obj, {"phase": DrainPhase.PENDING.value, "observedGeneration": generation,
                                         "message": f"waiting: {exc}"})
            return
        except IdempotencyKeyReused as exc:
            # This resource started a drain before its spec changed (its status write was lost): that drain
            # is still its drain; a spec change does not start another.
            view = await self.service.get(exc.drain_id)
            await self._set_status(obj, status_from_view(view, generation=generation))
            return
        log.info("drainrequest.submitted", name=meta["name"], namespace=meta.get("namespace"),
                 drain_id=record.id, created=created)
        view = await self.service.get(record.id)
        await self._set_status(obj, status_from_view(view, generation=generation))

    async def _write_meta(self, obj: Obj, *, finalizers: list[str]) -> Obj:
        meta = obj["metadata"]
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "finalizers": finalizers or None}}
        updated = await self.kube.patch(k.DRAINREQUESTS, meta["name"], patch, meta.get("namespace"))
        self.cache[meta["uid"]] = updated
        return updated

    async def _set_status(self, obj: Obj, status: Obj) -> None:
        current = obj.get("status") or {}
        wanted = {key: value for key, value in status.items() if value is not None}
        if all(current.get(key) == value for key, value in wanted.items()):
            return
        meta = obj["metadata"]
        updated = await self.kube.patch(DRAINREQUEST_STATUS, meta["name"], {"status": wanted}, meta.get("namespace"))
        if meta["uid"] in self.cache:
            self.cache[meta["uid"]] = updated


# ================================================================================================== run
async def run_controller(service: DrainService, kube: k.Kube, *, identity: str, stop: asyncio.Event,
                         namespace: str | None = None, lease_name: str = LEASE_NAME, lease_duration_s: float = 15.0,
                         renew_every_s: float = 5.0, retry_every_s: float = 2.0, resync_s: float = 1.0) -> None:
    """Campaign for the lease; while holding it, reconcile DrainRequests. Returns once `stop` is set."""
    renew_deadline_s = lease_duration_s * 2 / 3
    if not 0 < renew_every_s < renew_deadline_s:
        raise ValueError(f"renew_every_s: {renew_every_s} must be positive and below 2/3 of lease_duration_s "
                         f"({renew_deadline_s:.1f})")
    elector = LeaderElector(kube, identity=identity, namespace=namespace or default_namespace(), name=lease_name,
                            lease_duration_s=lease_duration_s)
    try:
        while not stop.is_set():
            if await _attempt(elector):
                await _lead(service, kube, elector, stop=stop, renew_every_s=renew_every_s,
                            renew_deadline_s=renew_deadline_s, resync_s=resync_s)
            else:
                await _wait(stop, retry_every_s)
    finally:
        with contextlib.suppress(k.KubeError):
            await elector.release()


async def _attempt(elector: LeaderElector) -> bool:
    try:
        return await elector.try_acquire_or_renew()
    except k.KubeError as exc:
        log.warning("leader.error", identity=elector.identity, error=str(exc))
        return False


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _lead(service: DrainService, kube: k.Kube, elector: LeaderElector, *, stop: asyncio.Event,
                renew_every_s: float, renew_deadline_s: float, resync_s: float) -> None:
    """Reconcile while the lease is ours; stop as soon as renewing failed for too long."""
    controller = DrainRequestController(service, kube, resync_s=resync_s)
    task = asyncio.create_task(controller.run(), name=f"drainrequest-controller:{elector.identity}")
    try:
        while not stop.is_set():
            await _wait(stop, renew_every_s)
            if stop.is_set():
                break
            if task.done():
                task.result()  # a crashed reconciler surfaces here instead of dying silently
            renewed = await _attempt(elector)
            # Step down before anyone else may take the lease: they wait a full lease duration after the last
            # renew they saw, we stop after the (shorter) renew deadline since our last successful renew.
            last = elector.last_renewed
            if not renewed and (last is None or time.monotonic() - last > renew_deadline_s):
                log.warning("leader.lost", identity=elector.identity)
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
