"""The Prometheus adapter: KubeVirt's live migration metrics per VMI, read from the Prometheus HTTP API.

What it promises:
- `MigrationMetricsReader.read(namespace=None)` returns one `VMIMigrationMetrics` per VMI whose migration
  Prometheus reports now (KubeVirt's virt-handler exports the series only while a transfer runs), keyed by
  `(namespace, name)`. One instant query per call (`/api/v1/query`, a regex on the five metric names).
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from orchestrator.settings import Settings

__all__ = ["METRICS", "MigrationMetricsReader", "VMIMigrationMetrics"]

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

    async def _query(self, query: str) -> dict[str, Any] | None:
        assert self.url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.get(f"{self.url}/api/v1/query", params={"query": query}) as resp:
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


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


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

