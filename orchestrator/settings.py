"""drainctl settings: frozen, typed, grouped by concern, parsed once at the edge and passed down.

Promises:
- Defaults mirror the HyperConverged ``liveMigrationConfig`` (5 per cluster, 2 outbound per node, 150 s/GiB,
  150 s progress timeout) plus our own knobs (inbound limit, pending timeout, retry backoff, leases).
- ``Settings.from_env(env, **overrides)`` reads ``DRAIN_*`` variables (and ``KUBECONFIG``) from the mapping it
  is given, never from ``os.environ`` behind the caller's back, and applies overrides (CLI flags) on top.
- Bad values fail fast with a :class:`SettingsError` naming the variable or field and the problem.
- All durations are cluster seconds; ``time_scale`` says how fast cluster time runs against wall time.

No module-level settings instance exists; callers build one and pass it along.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator.model import REQUEST_BOUNDS


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range. Never retryable: fix the input."""

    retryable = False


def _check(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise SettingsError(f"{name}: {problem}")


@dataclass(frozen=True)
class Limits:
    """How many migrations drainctl lets run at once. The planner also caps these at KubeVirt's values."""

    max_in_flight_cluster: int = 5
    """Migrations in flight cluster-wide (KubeVirt parallelMigrationsPerCluster, default 5)."""
    max_in_flight_per_node: int = 2
    """Migrations in flight out of one source node (KubeVirt parallelOutboundMigrationsPerNode, default 2)."""
    max_inbound_per_node: int = 2
    """Migrations in flight into one target node. Ours: KubeVirt has no inbound limit."""

    def __post_init__(self) -> None:
        for name in ("max_in_flight_cluster", "max_in_flight_per_node", "max_inbound_per_node"):
            value = getattr(self, name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            _check(is_int, name, f"{value!r} is not an integer")
            _check(1 <= value <= 10_000, name, f"{value} is out of range 1..10000")


@dataclass(frozen=True)
class Timeouts:
    """Per-migration and retry timing, in cluster seconds."""

    completion_timeout_per_gib: int = 150
    """Abort a migration running longer than this x its data size in GB (KubeVirt completionTimeoutPerGiB)."""
    progress_timeout_s: float = 150.0
    """Abort when a migration made no progress for this long (KubeVirt progressTimeout)."""
    pending_timeout_s: float = 300.0
    """Abort a VMIM stuck in Pending/Scheduling this long (KubeVirt's unschedulable-pod timeout is 300 s)."""
    retry_backoff_s: float = 20.0
    """First retry delay after a failed attempt; doubles per attempt (KubeVirt's evacuation backoff)."""
    retry_backoff_max_s: float = 300.0
    """Ceiling of the doubling retry delay."""
    lease_ttl_s: float = 30.0
    """Semaphore lease lifetime; holders renew well before it ends, expiry triggers a re-check."""
    plan_reuse_s: float = 60.0
    """The plan job carries out the plan a drain was submitted with when it is younger than this and still
    matches the cluster (orchestrator.replan); an older one is made again."""

    def __post_init__(self) -> None:
        value = self.completion_timeout_per_gib
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            "completion_timeout_per_gib",
            f"{value!r} is not an integer",
        )
        _check(value >= 1, "completion_timeout_per_gib", f"{value} must be at least 1")
        for name in ("progress_timeout_s", "pending_timeout_s", "retry_backoff_s", "lease_ttl_s", "plan_reuse_s"):
            seconds = getattr(self, name)
            _check(math.isfinite(seconds) and seconds > 0, name, f"{seconds!r} must be a positive number")
        # No default above what a drain request may ask for (small values stay allowed: tests run at scale).
        for name in ("completion_timeout_per_gib", "progress_timeout_s", "pending_timeout_s"):
            high = REQUEST_BOUNDS[name].high
            _check(getattr(self, name) <= high, name, f"{getattr(self, name)!r} is above {high}")
        _check(
            math.isfinite(self.retry_backoff_max_s) and self.retry_backoff_max_s >= self.retry_backoff_s,
            "retry_backoff_max_s",
            f"{self.retry_backoff_max_s!r} must be at least retry_backoff_s ({self.retry_backoff_s})",
        )

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt`` (2 = first retry): retry_backoff_s doubling, capped."""
        if attempt <= 1:
            return 0.0
        return float(min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempt - 2)))


@dataclass(frozen=True)
class Retry:
    """How often one VM is tried before it is reported failed."""

    max_attempts: int = 3
    """Attempts per VM, the first included; each retry goes to a different target than the one that failed."""
    start_on_expected_rung: bool = True
    """A VM the plan expects to be hard (its last known dirty rate) starts on the rung of the escalation ladder
    expected to move it, where allowed, instead of failing a plain attempt first (`DRAIN_START_ON_EXPECTED_RUNG`,
    false to climb from a plain attempt)."""

    def __post_init__(self) -> None:
        value = self.max_attempts
        _check(isinstance(value, int) and not isinstance(value, bool), "max_attempts", f"{value!r} not int")
        bound = REQUEST_BOUNDS["max_attempts"]
        _check(bound.admits(value), "max_attempts", f"{value} is out of range {bound}")


@dataclass(frozen=True)
class Connection:
    """Where the cluster and Redis are."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the queue, semaphores and the drain store (redis://, rediss:// or unix://)."""
    kubeconfig: str | None = None
    """Kubeconfig path; None means the client's default lookup (in-cluster, then ~/.kube/config)."""
    context: str | None = None
    """Kubeconfig context; None means the current context."""
    queue_name: str = "drainctl"
    """arq queue name, also the prefix that separates deployments sharing one Redis."""
    prometheus_url: str | None = None
    """Prometheus HTTP API base URL (e.g. the cluster's thanos-querier) for KubeVirt's live migration metrics;
    None: drainctl works without them, from time alone."""
    prometheus_token: str | None = field(default=None, repr=False)
    """Bearer token sent to Prometheus (e.g. a service account token); None sends none."""

    def __post_init__(self) -> None:
        _check(
            re.match(r"^(redis|rediss|unix)://", self.redis_url) is not None,
            "redis_url",
            f"{self.redis_url!r} must start with redis://, rediss:// or unix://",
        )
        _check(self.kubeconfig is None or self.kubeconfig != "", "kubeconfig", "empty path")
        _check(self.context is None or self.context != "", "context", "empty context name")
        _check(
            re.fullmatch(r"[A-Za-z0-9_.:-]+", self.queue_name) is not None,
            "queue_name",
            f"{self.queue_name!r} may only contain letters, digits and _ . : -",
        )
        _check(
            self.prometheus_url is None or re.match(r"^https?://[^/\s]+", self.prometheus_url) is not None,
            "prometheus_url",
            f"{self.prometheus_url!r} must be an http:// or https:// URL",
        )
        _check(self.prometheus_token is None or self.prometheus_token.strip() != "", "prometheus_token",
               "empty token")


@dataclass(frozen=True)
class EstimateModel:
    """Inputs of the planner's duration estimate. The API exposes no NIC speed, so these are assumptions."""

    setup_s: float = 10.0
    """Fixed per-migration overhead before transfer (VMIM admission, target pod start); model 5.1 median."""
    node_bandwidth_bytes_per_s: float = 1.125e9
    """Migration bandwidth of one source node: 10 GbE at 90 % efficiency, shared by its migrations."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.setup_s) and self.setup_s >= 0, "setup_s", f"{self.setup_s!r} must be >= 0")
        _check(
            math.isfinite(self.node_bandwidth_bytes_per_s) and self.node_bandwidth_bytes_per_s > 0,
            "node_bandwidth_bytes_per_s",
            f"{self.node_bandwidth_bytes_per_s!r} must be a positive number",
        )


_GROUPS: Mapping[str, type] = {
    "limits": Limits,
    "timeouts": Timeouts,
    "retry": Retry,
    "connection": Connection,
    "estimate": EstimateModel,
}

# DRAIN_* variable -> (group, field). KUBECONFIG is read too (DRAIN_KUBECONFIG wins).
ENV_VARS: Mapping[str, tuple[str, str]] = {
    "DRAIN_MAX_IN_FLIGHT": ("limits", "max_in_flight_cluster"),
    "DRAIN_MAX_PER_NODE": ("limits", "max_in_flight_per_node"),
    "DRAIN_MAX_INBOUND_PER_NODE": ("limits", "max_inbound_per_node"),
    "DRAIN_COMPLETION_TIMEOUT_PER_GIB": ("timeouts", "completion_timeout_per_gib"),
    "DRAIN_PROGRESS_TIMEOUT": ("timeouts", "progress_timeout_s"),
    "DRAIN_PENDING_TIMEOUT": ("timeouts", "pending_timeout_s"),
    "DRAIN_RETRY_BACKOFF": ("timeouts", "retry_backoff_s"),
    "DRAIN_RETRY_BACKOFF_MAX": ("timeouts", "retry_backoff_max_s"),
    "DRAIN_LEASE_TTL": ("timeouts", "lease_ttl_s"),
    "DRAIN_PLAN_REUSE": ("timeouts", "plan_reuse_s"),
    "DRAIN_MAX_ATTEMPTS": ("retry", "max_attempts"),
    "DRAIN_START_ON_EXPECTED_RUNG": ("retry", "start_on_expected_rung"),
    "DRAIN_REDIS_URL": ("connection", "redis_url"),
    "DRAIN_KUBECONFIG": ("connection", "kubeconfig"),
    "DRAIN_CONTEXT": ("connection", "context"),
    "DRAIN_QUEUE_NAME": ("connection", "queue_name"),
    "DRAIN_PROMETHEUS_URL": ("connection", "prometheus_url"),
    "DRAIN_PROMETHEUS_TOKEN": ("connection", "prometheus_token"),
    "DRAIN_ESTIMATE_SETUP": ("estimate", "setup_s"),
    "DRAIN_ESTIMATE_NODE_BANDWIDTH": ("estimate", "node_bandwidth_bytes_per_s"),
}
TIME_SCALE_VAR = "DRAIN_TIME_SCALE"

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from "150", "150s", "2.5m", "1h" or "500ms"; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 150, 150s, 2m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false (1/0, true/false, yes/no, on/off)")


def _parser_for(group: str, name: str) -> Callable[[str], Any]:
    if name == "completion_timeout_per_gib":
        return _parse_int
    if name == "node_bandwidth_bytes_per_s":
        return _parse_float
    if name.endswith("_s"):
        return parse_duration
    default = getattr(_GROUPS[group](), name)
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return _parse_int
    return str


_T = TypeVar("_T")


def _replace(group: _T, changes: Mapping[str, Any], source: Mapping[str, str]) -> _T:
    """dataclasses.replace, turning validation errors into messages naming the env variable."""
    if not changes:
        return group
    try:
        return dataclasses.replace(group, **changes)  # type: ignore[type-var]
    except SettingsError as exc:
        field_name = str(exc).split(":", 1)[0]
        origin = source.get(field_name)
        if origin is None:
            if source:
                raise SettingsError(f"{exc} (given: {', '.join(sorted(source.values()))})") from None
            raise
        raise SettingsError(f"{origin}: {str(exc).split(':', 1)[1].strip()}") from None


@dataclass(frozen=True)
class Settings:
    """Everything configurable, grouped by concern. Build with ``Settings.from_env`` or directly."""

    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: Retry = field(default_factory=Retry)
    connection: Connection = field(default_factory=Connection)
    estimate: EstimateModel = field(default_factory=EstimateModel)
    time_scale: float = 1.0
    """Cluster seconds per wall second (the simulator's --time-scale); timeouts are in cluster seconds."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.time_scale, int | float)
            and math.isfinite(self.time_scale)
            and 0 < self.time_scale <= 100_000,
            "time_scale",
            f"{self.time_scale!r} must be a number in (0, 100000]",
        )

    def to_wall(self, cluster_seconds: float) -> float:
        """Wall-clock seconds that ``cluster_seconds`` of cluster time take."""
        return cluster_seconds / self.time_scale

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``DRAIN_*`` variables in ``env`` (see ENV_VARS), then ``overrides`` on top.

        Overrides are either a whole group (``limits=Limits(...)``) or a field by name
        (``redis_url="redis://..."``, ``max_attempts=5``, ``time_scale=60``); a None value means "not given",
        so CLI options can be passed straight through. Unknown names raise SettingsError.
        """
        changes: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        sources: dict[str, dict[str, str]] = {name: {} for name in _GROUPS}

        kubeconfig = env.get("KUBECONFIG")
        if kubeconfig and "DRAIN_KUBECONFIG" not in env:
            # KUBECONFIG may list several files; the first is the one clients write to and read first.
            changes["connection"]["kubeconfig"] = kubeconfig.split(":")[0] or kubeconfig
            sources["connection"]["kubeconfig"] = "KUBECONFIG"
        for var, (group, name) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None:
                continue
            if raw.strip() == "":
                raise SettingsError(f"{var}: is set but empty")
            try:
                changes[group][name] = _parser_for(group, name)(raw)
            except ValueError as exc:
                raise SettingsError(f"{var}: {exc}") from None
            sources[group][name] = var
        time_scale: Any = 1.0
        time_scale_source = "time_scale"
        if TIME_SCALE_VAR in env:
            try:
                time_scale = _parse_float(env[TIME_SCALE_VAR])
            except ValueError as exc:
                raise SettingsError(f"{TIME_SCALE_VAR}: {exc}") from None
            time_scale_source = TIME_SCALE_VAR

        given = {key: value for key, value in overrides.items() if value is not None}
        field_owner = {f.name: g for g, c in _GROUPS.items() for f in dataclasses.fields(c)}
        bases: dict[str, Any] = {name: group_cls() for name, group_cls in _GROUPS.items()}
        for key, value in given.items():
            if key in _GROUPS:
                expected = _GROUPS[key]
                if not isinstance(value, expected):
                    raise SettingsError(f"{key}: expected {expected.__name__}, got {type(value).__name__}")
                # A whole group given explicitly beats the environment for that group.
                bases[key] = value
                changes[key].clear()
                sources[key].clear()
            elif key not in field_owner and key != "time_scale":
                raise SettingsError(f"{key}: unknown setting")
        for key, value in given.items():
            if key == "time_scale":
                time_scale, time_scale_source = value, "time_scale"
            elif key in field_owner:
                changes[field_owner[key]][key] = value
                sources[field_owner[key]].pop(key, None)

        built = {name: _replace(bases[name], changes[name], sources[name]) for name in _GROUPS}
        try:
            return cls(**built, time_scale=time_scale)
        except SettingsError as exc:
            if time_scale_source == "time_scale":
                raise
            raise SettingsError(f"{time_scale_source}: {str(exc).split(':', 1)[1].strip()}") from None
