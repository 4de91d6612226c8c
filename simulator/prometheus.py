"""KubeVirt's live-migration metrics, served the way the cluster's Prometheus serves them.

What it promises:
- `MigrationMetrics` samples every running migration's transfer like virt-handler's migration domain-stats
  collector (kubevirt/kubevirt `pkg/monitoring/metrics/virt-handler/migrationdomainstats/`: `queue.go` polls
  libvirt's job info every 5 s while `vmi.status.migrationState` is not completed, `migrationstats_collector.go`
  names the series and their labels `namespace`, `name`, `node`). The metric names and types are those of
  KubeVirt's `docs/observability/metrics.md`: `kubevirt_vmi_migration_data_bytes_total` (counter),
  `kubevirt_vmi_migration_data_processed_bytes`, `kubevirt_vmi_migration_data_remaining_bytes`,
  `kubevirt_vmi_migration_memory_transfer_rate_bytes`, `kubevirt_vmi_migration_dirty_memory_rate_bytes`
  (gauges, bytes and bytes/s; the dirty rate is libvirt's pages/s x page size, `statsconv/converter.go`).
  Scrape-target labels are added as the ServiceMonitor virt-operator installs would add them with
  `honorLabels: true` (`container`, `endpoint`, `instance`, `job`, `pod`, `service`). A series ends when its
  migration's transfer ends: Prometheus marks it stale and an instant query no longer returns it.
- `kubevirt_vmi_dirty_rate_bytes_per_second` (domainstats/dirty_rate_collector.go, dirty_rate_metrics.go): the
  guest dirty rate of every Running VMI that is not migrating, libvirt's 1-second calculation in whole MiB/s,
  read from the cluster's state at query time (a range query repeats the current value).
- `PrometheusApi` serves `/api/v1/query` (instant) and `/api/v1/query_range` (GET or form POST) for instant
  vector selectors: a metric name and/or label matchers `=`, `!=`, `=~`, `!~` (regexes fully anchored, as
  Prometheus anchors them), answering Prometheus's JSON exactly (`{"status":"success","data":{"resultType":
  "vector","result":[{"metric":{...},"value":[ts,"v"]}]}}`). Anything else PromQL has (functions, operators,
  range selectors, offsets) is refused with Prometheus's 400 `bad_data` error JSON saying it is not served
  here. Samples older than the 5-minute lookback are not returned, as in Prometheus.
- A bearer token guards every path, as kube-rbac-proxy / oauth-proxy in front of a cluster's Prometheus does
  (401 `Unauthorized` otherwise). These are metrics a real cluster shows, not ground truth: the cluster token
  may read them.

It reads the controllers' state and never writes it. It imports nothing of `orchestrator` or `workers`.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web

from simulator.kubevirt import KubeVirtSim, Migration, vmi_key
from simulator.resources import PODS, VMIS
from simulator.store import Store

__all__ = [
    "METRIC_NAMES",
    "MigrationMetrics",
    "PromQLError",
    "PrometheusApi",
    "Selector",
    "SeriesStore",
    "build_prometheus_app",
    "parse_selector",
]

log = structlog.get_logger("simulator.prometheus")

POLL_INTERVAL_S = 5.0
"""virt-handler polls a migrating domain's job info this often (migrationdomainstats/queue.go pollingInterval)."""
LOOKBACK_S = 300.0
"""Prometheus's default --query.lookback-delta."""
RETENTION_S = 3600.0
"""How much sample history this server keeps (range queries reach back this far)."""
MAX_POINTS = 11_000
"""Prometheus refuses range queries with more points per series than this."""

DATA_TOTAL = "kubevirt_vmi_migration_data_bytes_total"
DATA_PROCESSED = "kubevirt_vmi_migration_data_processed_bytes"
DATA_REMAINING = "kubevirt_vmi_migration_data_remaining_bytes"
TRANSFER_RATE = "kubevirt_vmi_migration_memory_transfer_rate_bytes"
DIRTY_RATE = "kubevirt_vmi_migration_dirty_memory_rate_bytes"
METRIC_NAMES = (DATA_TOTAL, DATA_PROCESSED, DATA_REMAINING, TRANSFER_RATE, DIRTY_RATE)
GUEST_DIRTY_RATE = "kubevirt_vmi_dirty_rate_bytes_per_second"
"""The guest's dirty rate outside migrations (domainstats/dirty_rate_metrics.go), libvirt's 1 s calculation."""
_MIB = 1024 * 1024

# What the ServiceMonitor virt-operator installs (components/prometheus.go) adds to each series.
_SERVICE = "kubevirt-prometheus-metrics"
_METRICS_PORT = 8443

LabelSet = tuple[tuple[str, str], ...]


# ------------------------------------------------------------------------------------------- the TSDB
@dataclass
class Series:
    labels: dict[str, str]
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    stale_at: float | None = None
    """Time of the staleness marker written when the series vanished from a scrape, if it did."""


class SeriesStore:
    """A tiny time-series store: append samples per label set, mark series stale, evaluate selectors."""

    def __init__(self, *, retention_s: float = RETENTION_S) -> None:
        self.retention_s = retention_s
        self._series: dict[LabelSet, Series] = {}
        self._live: dict[str, Callable[[], Iterable[tuple[dict[str, str], float]]]] = {}

    def add_live(self, name: str, provider: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        """A metric family read from the cluster's current state when queried instead of stored: for gauges
        of many series whose value only changes with the state (a query for a past time gets the current
        state)."""
        self._live[name] = provider

    def _live_rows(self, selector: Selector) -> list[tuple[dict[str, str], float]]:
        rows = []
        for name, provider in self._live.items():
            if not selector.may_match_name(name):
                continue
            for labels, value in provider():
                full = dict(sorted({"__name__": name, **labels}.items()))
                if selector.matches(full):
                    rows.append((full, value))
        return rows

    def append(self, labels: Mapping[str, str], t: float, value: float) -> None:
        key = tuple(sorted(labels.items()))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Series(dict(key))  # Prometheus keeps label sets sorted by name
        series.stale_at = None
        series.samples.append((t, value))

    def mark_stale(self, keep: set[LabelSet], t: float) -> None:
        """A scrape at `t` returned only the series in `keep`: every other live series goes stale."""
        for key, series in list(self._series.items()):
            if key not in keep and series.stale_at is None:
                series.stale_at = t
            while series.samples and series.samples[0][0] < t - self.retention_s:
                series.samples.popleft()
            if not series.samples:
                del self._series[key]

    @staticmethod
    def key(labels: Mapping[str, str]) -> LabelSet:
        return tuple(sorted(labels.items()))

    def instant(self, selector: Selector, at: float) -> list[tuple[dict[str, str], float]]:
        """The value each matching series has at `at`: its newest sample no older than the lookback, unless
        a staleness marker came after that sample."""
        out = []
        for series in self._series.values():
            if not selector.matches(series.labels):
                continue
            value = _value_at(series, at)
            if value is not None:
                out.append((series.labels, value))
        out.extend(self._live_rows(selector))
        out.sort(key=lambda item: sorted(item[0].items()))
        return out

    def range(self, selector: Selector, start: float, end: float,
              step: float) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        n = math.floor((end - start) / step + 1e-9) + 1
        out = []
        for series in self._series.values():
            if not selector.matches(series.labels):
                continue
            points = []
            for i in range(n):
                t = start + i * step
                value = _value_at(series, t)
                if value is not None:
                    points.append((t, value))
            if points:
                out.append((series.labels, points))
        out.extend((labels, [(start + i * step, value) for i in range(n)])
                   for labels, value in self._live_rows(selector))
        out.sort(key=lambda item: sorted(item[0].items()))
        return out


def _value_at(series: Series, at: float) -> float | None:
    best: tuple[float, float] | None = None
    for t, v in reversed(series.samples):
        if t <= at:
            best = (t, v)
            break
    if best is None or best[0] <= at - LOOKBACK_S:
        return None
    if series.stale_at is not None and best[0] < series.stale_at <= at:
        return None
    return best[1]


# ------------------------------------------------------------------------------------ the collector
class MigrationMetrics:
    """virt-handler's migration domain-stats collector plus a Prometheus scraping it, on cluster time.

    Register it with `kubevirt.probes` so the controllers stop at every poll instant; each poll writes one
    sample per metric for every migration whose transfer is running, and marks the others stale.
    """

    def __init__(self, kubevirt: KubeVirtSim, store: Store, *, start: float,
                 interval_s: float = POLL_INTERVAL_S, retention_s: float = RETENTION_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.kubevirt = kubevirt
        self.store = store
        self.interval_s = interval_s
        self.series = SeriesStore(retention_s=retention_s)
        self.next_at = start
        self.polls = 0
        self._labels_of: dict[str, dict[str, str]] = {}  # migration uid -> its series' labels
        self.series.add_live(GUEST_DIRTY_RATE, self._guest_dirty_rates)

    def observe(self, now: float) -> None:
        keep: set[LabelSet] = set()
        labels_of: dict[str, dict[str, str]] = {}
        for mig in list(self.kubevirt.active.values()):
            tr = mig.transfer
            if tr is None or tr.finished or mig.complete_at is not None:
                continue
            base = labels_of[mig.uid] = self._labels_of.get(mig.uid) or self._labels(mig)
            physics = self.kubevirt.vm_info(vmi_key(mig.namespace, mig.vmi)).physics
            values = {
                DATA_TOTAL: float(physics.memory_bytes),
                DATA_PROCESSED: float(tr.bytes_sent),
                DATA_REMAINING: float(tr.data_remaining),
                TRANSFER_RATE: float(round(mig.rate)),
                DIRTY_RATE: float(round(tr.measured_dirty_rate)),
            }
            for name, value in values.items():
                labels = {"__name__": name, **base}
                self.series.append(labels, now, value)
                keep.add(SeriesStore.key(labels))
        self._labels_of = labels_of
        self.series.mark_stale(keep, now)
        self.polls += 1
        # the next poll instant strictly after now, on the fixed grid
        steps = math.floor((now - self.next_at) / self.interval_s) + 1
        self.next_at += max(1, steps) * self.interval_s

    def _labels(self, mig: Migration) -> dict[str, str]:
        return self._vmi_labels(mig.namespace, mig.vmi, mig.source or "", {})

    def _vmi_labels(self, namespace: str, name: str, node: str,
                    handlers: dict[str, tuple[str, str] | None]) -> dict[str, str]:
        labels = {"namespace": namespace, "name": name, "node": node,
                  "container": "virt-handler", "endpoint": "metrics", "job": _SERVICE, "service": _SERVICE}
        if node not in handlers:
            handlers[node] = self._virt_handler(node)
        handler = handlers[node]
        if handler is not None:
            labels["pod"] = handler[0]
            labels["instance"] = f"{handler[1]}:{_METRICS_PORT}"
        return labels

    def _guest_dirty_rates(self) -> list[tuple[dict[str, str], float]]:
        """kubevirt_vmi_dirty_rate_bytes_per_second for every Running VMI not in a started migration
        (dirty_rate_collector.go filterDirtyRateEligible): libvirt counts the distinct pages dirtied in a 1 s
        calculation, reported in whole MiB/s."""
        rows = []
        handlers: dict[str, tuple[str, str] | None] = {}
        for vmi in self.store.iter(VMIS):
            status = vmi.get("status") or {}
            state = status.get("migrationState") or {}
            if status.get("phase") != "Running" or (state.get("startTimestamp") and not state.get("completed")
                                                     and not state.get("failed")):
                continue
            meta = vmi["metadata"]
            physics = self.kubevirt.vm_info(vmi_key(meta["namespace"], meta["name"]), vmi).physics
            per_second = min(physics.dirty_bytes_per_s, float(physics.wws_bytes))
            value = float(int(per_second // _MIB) * _MIB)
            rows.append((self._vmi_labels(meta["namespace"], meta["name"], status.get("nodeName") or "", handlers),
                         value))
        return rows

    def _virt_handler(self, node: str) -> tuple[str, str] | None:
        for pod in self.store.on_node(PODS, node):
            if (pod["metadata"].get("labels") or {}).get("kubevirt.io") == "virt-handler":
                return str(pod["metadata"]["name"]), str((pod.get("status") or {}).get("podIP") or "")
        return None


# ------------------------------------------------------------------------------------------- PromQL
class PromQLError(ValueError):
    """A query this server cannot answer; the message is Prometheus's wording where it has one."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        self.position = position
        text = message if position is None else f"1:{position + 1}: parse error: {message}"
        super().__init__(text)


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        found = self.regex.fullmatch(actual) is not None
        return found if self.op == "=~" else not found


@dataclass(frozen=True)
class Selector:
    matchers: tuple[Matcher, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)

    def may_match_name(self, name: str) -> bool:
        """Whether the metric-name matchers allow `name` (the other labels are not looked at)."""
        probe = {"__name__": name}
        return all(m.matches(probe) for m in self.matchers if m.name == "__name__")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OPS = ("=~", "!~", "!=", "=")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
            "'": "'", '"': '"'}
_UNSUPPORTED = ("this server answers instant vector selectors only (a metric name and/or label matchers "
                "=, !=, =~, !~)")


def parse_selector(query: str) -> Selector:
    """Parse `name{label="v", ...}` / `{__name__=~"re", ...}`; raise PromQLError for anything else."""
    parser = _Parser(query)
    return parser.parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Selector:
        self._skip()
        if self.pos >= len(self.text):
            raise PromQLError("no expression found in input", position=self.pos)
        matchers: list[Matcher] = []
        name_match = _METRIC_NAME.match(self.text, self.pos)
        if name_match is not None:
            name = name_match.group()
            self.pos = name_match.end()
            matchers.append(Matcher("__name__", "=", name))
            self._skip()
            if self.pos < len(self.text) and self.text[self.pos] == "(":
                raise PromQLError(f"{_UNSUPPORTED}; functions and aggregations such as {name}(...) are not "
                                  "served", position=name_match.start())
        if self.pos < len(self.text) and self.text[self.pos] == "{":
            self.pos += 1
            matchers.extend(self._matchers())
        elif name_match is None:
            raise PromQLError(f"unexpected character: {self.text[self.pos]!r}; {_UNSUPPORTED}",
                              position=self.pos)
        self._skip()
        if self.pos < len(self.text):
            raise PromQLError(f"unexpected {self.text[self.pos:self.pos + 10]!r}; {_UNSUPPORTED}",
                              position=self.pos)
        if all(m.matches({}) for m in matchers):
            raise PromQLError("vector selector must contain at least one non-empty matcher", position=0)
        return Selector(tuple(matchers))

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def _matchers(self) -> list[Matcher]:
        out: list[Matcher] = []
        while True:
            self._skip()
            if self.pos >= len(self.text):
                raise PromQLError("unexpected end of input inside braces", position=self.pos)
            if self.text[self.pos] == "}":
                self.pos += 1
                return out
            label = _LABEL_NAME.match(self.text, self.pos)
            if label is None:
                raise PromQLError(f"unexpected character inside braces: {self.text[self.pos]!r}",
                                  position=self.pos)
            self.pos = label.end()
            self._skip()
            op = next((o for o in _OPS if self.text.startswith(o, self.pos)), None)
            if op is None:
                raise PromQLError(f"unexpected {self.text[self.pos:self.pos + 1]!r} in label matching, expected "
                                  "one of \"=\", \"!=\", \"=~\" or \"!~\"", position=self.pos)
            self.pos += len(op)
            self._skip()
            value_at = self.pos
            value = self._string()
            regex = None
            if op in ("=~", "!~"):
                try:
                    regex = re.compile(f"(?:{value})", re.DOTALL)
                except re.error as exc:
                    raise PromQLError(f"error parsing regexp: {exc}", position=value_at) from None
            out.append(Matcher(label.group(), op, value, regex))
            self._skip()
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
            elif self.pos < len(self.text) and self.text[self.pos] != "}":
                raise PromQLError(f"unexpected {self.text[self.pos]!r} in label matching, expected \",\" or "
                                  "\"}\"", position=self.pos)

    def _string(self) -> str:
        if self.pos >= len(self.text) or self.text[self.pos] not in "\"'`":
            got = self.text[self.pos:self.pos + 1] or "end of input"
            raise PromQLError(f"unexpected {got!r} in label matching, expected string", position=self.pos)
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        chars: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(chars)
            if ch == "\\" and quote != "`":
                esc = self.text[self.pos + 1:self.pos + 2]
                if esc in _ESCAPES:
                    chars.append(_ESCAPES[esc])
                    self.pos += 2
                    continue
                raise PromQLError(f"unknown escape sequence \\{esc}", position=self.pos)
            if ch == "\n" and quote != "`":
                break
            chars.append(ch)
            self.pos += 1
        raise PromQLError("unterminated quoted string", position=start)


# --------------------------------------------------------------------------------------------- HTTP
def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (Go's strconv.FormatFloat(v, 'f', -1, 64))."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    return format(Decimal(text), "f") if "e" in text or "E" in text else text


def _ts(t: float) -> float | int:
    ms = round(t * 1000)
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        text=json.dumps({"status": "error", "errorType": error_type, "error": message},
                                        separators=(",", ":")))


def _success(data: Any) -> web.Response:
    return web.Response(content_type="application/json",
                        text=json.dumps({"status": "success", "data": data}, separators=(",", ":")))


class _BadParam(Exception):
    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f'invalid parameter "{name}": {problem}')


def _parse_time(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise _BadParam(name, f'cannot parse "{raw}" to a valid timestamp') from None
    if not math.isfinite(value):
        raise _BadParam(name, f'cannot parse "{raw}" to a valid timestamp')
    return value


_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def _parse_step(raw: str) -> float:
    try:
        value = float(raw)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    match = _DURATION.match(raw)
    if raw and match is not None and any(match.groups()):
        return sum(int(g) * u for g, u in zip(match.groups(), _DURATION_UNITS, strict=True) if g)
    raise _BadParam("step", f'cannot parse "{raw}" to a valid duration')


class PrometheusApi:
    """The HTTP side: `/api/v1/query` and `/api/v1/query_range` over a `SeriesStore`, behind a bearer token."""

    def __init__(self, series: SeriesStore, *, now: Callable[[], float],
                 tokens: Callable[[], Collection[str | None]] | None) -> None:
        self.series = series
        self.now = now
        self.tokens = tokens

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized\n", content_type="text/plain")
        path = request.path.rstrip("/")
        if path not in ("/api/v1/query", "/api/v1/query_range"):
            return web.Response(status=404, text="404 page not found\n", content_type="text/plain")
        if request.method not in ("GET", "POST"):
            return _error(405, "bad_data", f"method {request.method} not allowed")
        params: dict[str, str] = dict(request.query)
        if request.method == "POST":
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        try:
            if path == "/api/v1/query":
                return self._query(params)
            return self._query_range(params)
        except _BadParam as exc:
            return _error(400, "bad_data", str(exc))

    def _authorized(self, request: web.Request) -> bool:
        if self.tokens is None:
            return True
        allowed = {t for t in self.tokens() if t}
        if not allowed:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and given.strip() in allowed

    @staticmethod
    def _selector(params: Mapping[str, str]) -> Selector:
        try:
            return parse_selector(params.get("query", ""))
        except PromQLError as exc:
            raise _BadParam("query", str(exc)) from None

    def _query(self, params: Mapping[str, str]) -> web.Response:
        at = _parse_time("time", params["time"]) if params.get("time") else self.now()
        selector = self._selector(params)
        result = [{"metric": labels, "value": [_ts(at), format_value(v)]}
                  for labels, v in self.series.instant(selector, at)]
        return _success({"resultType": "vector", "result": result})

    def _query_range(self, params: Mapping[str, str]) -> web.Response:
        for name in ("start", "end", "step"):
            if not params.get(name):
                raise _BadParam(name, f'cannot parse "" to a valid {"duration" if name == "step" else "timestamp"}')
        start = _parse_time("start", params["start"])
        end = _parse_time("end", params["end"])
        if end < start:
            raise _BadParam("end", "end timestamp must not be before start time")
        step = _parse_step(params["step"])
        if step <= 0:
            raise _BadParam("step", "zero or negative query resolution step widths are not accepted. Try a "
                                    "positive integer")
        if (end - start) / step > MAX_POINTS:
            return _error(400, "bad_data", "exceeded maximum resolution of 11,000 points per timeseries. Try "
                                           "decreasing the query resolution (?step=XX)")
        selector = self._selector(params)
        result = [{"metric": labels, "values": [[_ts(t), format_value(v)] for t, v in points]}
                  for labels, points in self.series.range(selector, start, end, step)]
        return _success({"resultType": "matrix", "result": result})


def build_prometheus_app(series: SeriesStore, *, now: Callable[[], float],
                         tokens: Callable[[], Collection[str | None]] | None) -> web.Application:
    api = PrometheusApi(series, now=now, tokens=tokens)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    return app


async def serve_prometheus(series: SeriesStore, *, now: Callable[[], float],
                           tokens: Callable[[], Collection[str | None]] | None, host: str = "127.0.0.1",
                           port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the Prometheus API on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = web.AppRunner(build_prometheus_app(series, now=now, tokens=tokens), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses: Iterable[Any] = runner.addresses
    bound = int(next(iter(addresses))[1])
    log.info("prometheus.started", host=host, port=bound)
    return runner, bound
