"""The Prometheus adapter: KubeVirt's live migration metrics per VMI, read from the Prometheus HTTP API.

What it promises:
- `MigrationMetricsReader.read(namespace=None)` returns one `VMIMigrationMetrics` per VMI whose migration
  Prometheus reports now (KubeVirt's virt-handler exports the series only while a transfer runs), keyed by
  `(namespace, name)`. One instant query per call (`/api/v1/query`, a regex on the five metric names).
- `MigrationMetricsReader.guest_dirty_rates(namespace=None)` returns each running VMI's guest dirty rate outside
  migrations (`kubevirt_vmi_dirty_rate_bytes_per_second`), what a plan can use to expect hard VMs.
- `MigrationMetricsReader.history(namespace, name, end=..., window_s=...)` returns one VMI's samples over the
  window before `end` (Prometheus time: take `VMIMigrationMetrics.at`), one range query
  (`/api/v1/query_range`), so a stateless job can judge a trend without keeping samples itself.
- It works without Prometheus: with no URL configured it returns `{}` without any I/O; when Prometheus is
  unreachable, refuses the token or answers an error it returns `{}` too, logs `prometheus.unavailable`
  once (warning) and `prometheus.recovered` once when it answers again, never an error per call.
- Every request has a timeout; the caller's cancellation is never swallowed.

What it must not do: decide anything. A verdict on convergence belongs to the engine's pure decision code;
this module only turns Prometheus JSON into typed numbers. It never imports kubernetes_asyncio.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from orchestrator.convergence import Sample
from orchestrator.settings import Settings

__all__ = ["METRICS", "MigrationHistory", "MigrationMetricsReader", "VMIMigrationMetrics"]

log = structlog.get_logger("orchestrator.prometheus")

# KubeVirt's names (docs/observability/metrics.md; virt-handler's migrationdomainstats collector).
METRICS: Mapping[str, str] = {
    "kubevirt_vmi_migration_data_bytes_total": "data_total_bytes",
    "kubevirt_vmi_migration_data_processed_bytes": "data_processed_bytes",
    "kubevirt_vmi_migration_data_remaining_bytes": "data_remaining_bytes",
    "kubevirt_vmi_migration_memory_transfer_rate_bytes": "transfer_rate_bytes_per_s",
    "kubevirt_vmi_migration_dirty_memory_rate_bytes": "dirty_rate_bytes_per_s",
}
_NAME_REGEX = "|".join(re.escape(name) for name in METRICS)
GUEST_DIRTY_RATE = "kubevirt_vmi_dirty_rate_bytes_per_second"
"""The guest's dirty rate outside migrations (virt-handler domainstats/dirty_rate_metrics.go)."""


@dataclass(frozen=True)
class VMIMigrationMetrics:
    """What Prometheus says about one VMI's running migration; None where a series is missing."""

    namespace: str
    name: str
    node: str | None
    """The source node (the virt-handler that reports the migration)."""
    at: float
    """Evaluation time of the query (Prometheus's clock, Unix seconds)."""
    data_total_bytes: float | None = None
    data_processed_bytes: float | None = None
    data_remaining_bytes: float | None = None
    transfer_rate_bytes_per_s: float | None = None
    dirty_rate_bytes_per_s: float | None = None


class MigrationMetricsReader:
    """Reads KubeVirt's migration metrics; a reader without a URL answers `{}` and does no I/O."""

    def __init__(self, url: str | None, *, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/") if url else None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._unavailable = False

    @classmethod
    def from_settings(cls, settings: Settings) -> MigrationMetricsReader:
        conn = settings.connection
        return cls(conn.prometheus_url, token=conn.prometheus_token)

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MigrationMetricsReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def read(self, *, namespace: str | None = None) -> dict[tuple[str, str], VMIMigrationMetrics]:
        """Per-VMI migration metrics now, optionally only in `namespace`; `{}` when there are none or Prometheus
        cannot be read."""
        if self.url is None:
            return {}
        query = f'{{__name__=~"{_NAME_REGEX}"'
        if namespace is not None:
            query += f',namespace="{_quote(namespace)}"'
        query += "}"
        body = await self._query(query)
        if body is None:
            return {}
        return parse_vector(body)

    async def guest_dirty_rates(self, *, namespace: str | None = None) -> dict[tuple[str, str], float]:
        """Each running VMI's guest dirty rate in bytes/s (`kubevirt_vmi_dirty_rate_bytes_per_second`, exported by
        virt-handler for VMIs that are not migrating); `{}` when there are none or Prometheus cannot be read."""
        if self.url is None:
            return {}
        query = GUEST_DIRTY_RATE if namespace is None else f'{GUEST_DIRTY_RATE}{{namespace="{_quote(namespace)}"}}'
        return dict(_vmi_values(await self._query(query)))

    async def node_dirty_rates(self, nodes: Sequence[str]) -> dict[str, float]:
        """The last known guest dirty rate (bytes/s) of every VMI on `nodes`, by "namespace/name": the planner's
        input for the VMs it expects to be hard. `{}` without Prometheus or nodes."""
        if self.url is None or not nodes:
            return {}
        pattern = "|".join(re.escape(node) for node in sorted(set(nodes)))
        body = await self._query(f'{GUEST_DIRTY_RATE}{{node=~"{_quote(pattern)}"}}')
        return {f"{ns}/{name}": value for (ns, name), value in _vmi_values(body)}

    async def history(self, namespace: str, name: str, *, end: float, window_s: float = 60.0,
                      step_s: float = 5.0) -> MigrationHistory | None:
        """One VMI's migration samples in [end - window_s, end], every step_s; None when there are none or
        Prometheus cannot be read."""
        if self.url is None:
            return None
        if not (window_s > 0 and step_s > 0):
            raise ValueError(f"window_s and step_s must be > 0, got {window_s} and {step_s}")
        query = f'{{__name__=~"{_NAME_REGEX}",namespace="{_quote(namespace)}",name="{_quote(name)}"}}'
        body = await self._query(query, path="query_range",
                                 extra={"start": f"{end - window_s:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"})
        if body is None:
            return None
        return parse_matrix(body, namespace, name)

    async def _query(self, query: str, *, path: str = "query",
                     extra: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        assert self.url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        params = {"query": query, **(extra or {})}
        try:
            async with self._session.get(f"{self.url}/api/v1/{path}", params=params) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    self._failed(f"HTTP {resp.status}: {text.strip()}")
                    return None
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(body, dict) or body.get("status") != "success":
            self._failed(f"unexpected answer: {str(body)[:300]}")
            return None
        if self._unavailable:
            self._unavailable = False
            log.info("prometheus.recovered", url=self.url)
        return body

    def _failed(self, reason: str) -> None:
        if not self._unavailable:
            self._unavailable = True
            log.warning("prometheus.unavailable", url=self.url, reason=reason,
                        effect="migration metrics are not used until Prometheus answers again")
        return None


@dataclass(frozen=True)
class MigrationHistory:
    """One VMI's migration samples from a range query: (Prometheus time, value) per metric, oldest first."""

    namespace: str
    name: str
    data_total_bytes: tuple[tuple[float, float], ...] = ()
    data_processed_bytes: tuple[tuple[float, float], ...] = ()
    data_remaining_bytes: tuple[tuple[float, float], ...] = ()
    transfer_rate_bytes_per_s: tuple[tuple[float, float], ...] = ()
    dirty_rate_bytes_per_s: tuple[tuple[float, float], ...] = ()

    def samples(self) -> list[Sample]:
        """The instants where remaining bytes, transfer rate and dirty rate are all known, for `judge`, of the
        VMI's newest migration only: its processed bytes start again from zero with each migration, so what
        came before their last drop belongs to an earlier attempt (another bandwidth, another target)."""
        start = -math.inf
        for (_, before), (t, after) in zip(self.data_processed_bytes, self.data_processed_bytes[1:], strict=False):
            if after < before:
                start = t
        transfer = dict(self.transfer_rate_bytes_per_s)
        dirty = dict(self.dirty_rate_bytes_per_s)
        return [Sample(t=t, remaining_bytes=v, transfer_rate=transfer[t], dirty_rate=dirty[t])
                for t, v in self.data_remaining_bytes if t >= start and t in transfer and t in dirty]


def parse_matrix(body: Mapping[str, Any], namespace: str, name: str) -> MigrationHistory | None:
    """Prometheus's range-query JSON for one VMI -> its history; None when no series came back."""
    data = body.get("data") or {}
    if data.get("resultType") != "matrix":
        return None
    fields: dict[str, tuple[tuple[float, float], ...]] = {}
    for item in data.get("result") or []:
        metric = item.get("metric") or {}
        attr = METRICS.get(metric.get("__name__", ""))
        if attr is None or metric.get("namespace") != namespace or metric.get("name") != name:
            continue
        points = []
        for pair in item.get("values") or []:
            try:
                t, v = float(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError):
                continue
            if math.isfinite(v):
                points.append((t, v))
        fields[attr] = tuple(sorted(points))
    if not fields:
        return None
    return MigrationHistory(namespace=namespace, name=name, **fields)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _vmi_values(body: dict[str, Any] | None) -> Iterator[tuple[tuple[str, str], float]]:
    """((namespace, name), value) of each finite sample of an instant-query vector; nothing for another answer."""
    if body is None or (body.get("data") or {}).get("resultType") != "vector":
        return
    for item in body["data"].get("result") or []:
        metric = item.get("metric") or {}
        try:
            value = float((item.get("value") or [0, "nan"])[1])
        except (TypeError, ValueError):
            continue
        if metric.get("namespace") and metric.get("name") and math.isfinite(value):
            yield (metric["namespace"], metric["name"]), value


def parse_vector(body: Mapping[str, Any]) -> dict[tuple[str, str], VMIMigrationMetrics]:
    """Prometheus's instant-vector JSON -> per-VMI metrics. Series without namespace/name are ignored."""
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        return {}
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    for item in data.get("result") or []:
        metric = item.get("metric") or {}
        attr = METRICS.get(metric.get("__name__", ""))
        ns, name = metric.get("namespace"), metric.get("name")
        value = item.get("value") or []
        if attr is None or not ns or not name or len(value) != 2:
            continue
        try:
            at, number = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            continue
        entry = fields.setdefault((ns, name), {"namespace": ns, "name": name, "node": metric.get("node"), "at": at})
        entry[attr] = number
    return {key: VMIMigrationMetrics(**entry) for key, entry in fields.items()}

