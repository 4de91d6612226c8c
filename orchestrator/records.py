"""Typed drain records: the drain, its nodes, every VM and every migration attempt, as stored in Redis.

Promises:
- one model per record, with every field the engine writes; phases are the enums of ``orchestrator.model``
  (``is_final`` answers "is this over" in one place);
- ``orchestrator.store`` alone turns them into JSON and back (``to_json`` / ``from_json`` here are its tools);
  the JSON keeps the field names the API, ``drainctl status -o json`` and the report have always shown;
- unknown fields in a stored record are ignored (a record written by a newer version still loads).
It does not talk to Redis or the cluster and decides nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.model import DrainPhase, DrainRequest, FailureClass, NodePhase, VmPhase, VmVerdict
from orchestrator.tuning import TransferSample


class BaseRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (enums as their strings), every field present."""
        return self.model_dump(mode="json")


class StoredRecord(BaseRecord):
    """A record the store keeps under its own key or hash field; the store stamps every change."""

    updated_at: float | None = None


class DrainLimits(BaseRecord):
    """The effective limits the plan settled on (ours against KubeVirt's, the stricter one)."""

    cluster: int
    per_node: int
    inbound: int
    max_attempts: int
    pending_timeout_s: float
    completion_timeout_per_gib: float
    progress_timeout_s: float
    node_parallel: dict[str, int] = Field(default_factory=dict)
    """Per source node outbound limits below `per_node` (a tuned drain: a node whose VMs need more bandwidth
    runs fewer migrations at once)."""


class CancelRequest(BaseRecord):
    requested_at: float
    uncordon: bool = True
    mode: Literal["abort", "finish"] = "abort"


class DrainRecord(StoredRecord):
    id: str
    phase: DrainPhase = DrainPhase.PENDING
    message: str | None = None
    source: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any]
    """The DrainRequest as JSON (``DrainRequest.to_json``); see :meth:`drain_request`."""
    estimate_s: float | None = None
    warnings: list[str] = Field(default_factory=list)
    time_scale: float | None = None
    plan: dict[str, Any] | None = None
    """The DrainPlan as JSON, once planned."""
    limits: DrainLimits | None = None
    cancel: CancelRequest | None = None
    target_failures: dict[str, list[str]] = Field(default_factory=dict)
    """Per target node, the VMs that failed there (failures that say something about the node)."""
    quarantined: dict[str, str] = Field(default_factory=dict)
    """Target nodes this drain sends no VM to any more, with the reason."""

    @property
    def nodes(self) -> list[str]:
        """The requested nodes, in the order given."""
        return [str(n) for n in self.request.get("nodes") or []]

    @property
    def max_parallel_nodes(self) -> int:
        return int(self.request.get("max_parallel_nodes") or 1)

    @property
    def allow_post_copy(self) -> bool:
        return bool(self.request.get("allow_post_copy", False))

    @property
    def escalation(self) -> tuple[str, ...] | None:
        """The ladder's rungs the request names (None: the default; see orchestrator.escalation)."""
        value = self.request.get("escalation")
        return None if value is None else tuple(str(v) for v in value)

    @property
    def uncordon_on_cancel(self) -> bool:
        return bool(self.request.get("uncordon_on_cancel", True))

    def drain_request(self) -> DrainRequest:
        """Raises ValueError naming the field when the stored request does not parse."""
        return DrainRequest.from_json(self.request)


class NodeRecord(StoredRecord):
    node: str
    phase: NodePhase = NodePhase.PENDING
    index: int = 0
    wave: int = 0
    message: str = ""
    vms: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    evicted: int | None = None


class AttemptRecord(BaseRecord):
    """One migration attempt of one VM (one VMIM)."""

    attempt: int
    vmim: str | None = None
    target: str | None = None
    started_at: float | None = None
    """Wall time the VMIM was created."""
    running_at: float | None = None
    """Wall time the transfer began (VMIM phase Running); the completion budget counts from here."""
    finished_at: float | None = None
    outcome: VmPhase | None = None
    reason: str | None = None
    failure_class: FailureClass | None = None
    convergence: str | None = None
    """The last convergence verdict on the running pre-copy (orchestrator.convergence.Convergence's value:
    Converging or CannotConverge; None: never judged, no metrics)."""
    convergence_reason: str | None = None
    dirty_rate: float | None = None
    """Bytes/s the guest dirtied, as the verdict measured it."""
    transfer_rate: float | None = None
    """Bytes/s the network carried for this migration, as the verdict measured it."""
    rung: str | None = None
    """The escalation rung this attempt ran on (workers.jobs.ladder.Rung's value; None: a plain attempt)."""
    judged_at: float | None = None
    """When the verdict was reached, in the metrics' time (Prometheus's clock: the cluster's, Unix seconds)."""


class VmRecord(StoredRecord):
    vmi: str
    node: str
    phase: VmPhase = VmPhase.QUEUED
    verdict: VmVerdict | None = None
    reason: str = ""
    memory_bytes: int = 0
    proposed_target: str | None = None
    attempt: int = 0
    """The current (or last) attempt; 0 when never tried."""
    attempts: list[AttemptRecord] = Field(default_factory=list)
    failed_targets: list[str] = Field(default_factory=list)
    target: str | None = None
    vmim: str | None = None
    message: str = ""
    failure_class: FailureClass | None = None
    started_at: float | None = None
    finished_at: float | None = None
    enqueued: int | None = None
    """The attempt whose migrate job is in the queue (the node's feed window counts it)."""
    not_before_s: float | None = None
    """Wall time before which a retry does not start (backoff)."""
    expected_rung: str | None = None
    """The rung of the escalation ladder the plan expects this VM to need (from its last known dirty rate,
    `MigrationJob.expected_rung`): its first attempt starts there instead of climbing from a plain attempt."""
    busy_since: float | None = None
    """Wall time KubeVirt first refused this attempt because another migration of the VM runs (the wait for
    it has a deadline counted from here)."""

    @property
    def name(self) -> str:
        return self.vmi.partition("/")[2]

    @property
    def namespace(self) -> str:
        return self.vmi.partition("/")[0]

    def attempt_entry(self, attempt: int) -> AttemptRecord | None:
        return next((e for e in self.attempts if e.attempt == attempt), None)

    def put_attempt(self, entry: AttemptRecord) -> None:
        """Replace (or add) the entry of ``entry.attempt``, keeping the list in attempt order."""
        self.attempts = sorted([e for e in self.attempts if e.attempt != entry.attempt] + [entry],
                               key=lambda e: e.attempt)


class TransferRecord(BaseRecord):
    """One successful migration out of a node, as the node's observed bandwidth counts it
    (orchestrator.tuning.observed_bandwidth): its transfer in cluster seconds (wall stamps of the attempt
    record, from the VMIM turning Running to its success, times the time scale) and the memory it moved."""

    source: str
    target: str | None = None
    vmi: str
    drain_id: str
    attempt: int
    start_s: float
    end_s: float
    memory_bytes: int

    def sample(self) -> TransferSample:
        return TransferSample(start_s=self.start_s, end_s=self.end_s, memory_bytes=self.memory_bytes)
