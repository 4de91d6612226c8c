"""Server-side printing: `meta.k8s.io/v1` Table responses, as `kubectl get` asks for them.

Promises:
- the column definitions and cells of the real API server's printers for the built-in kinds we serve
  (nodes, pods, namespaces, events, daemonsets, PDBs, leases, CRDs), every column included (kubectl hides
  `priority > 0` columns unless `-o wide`), and KubeVirt's CRD `additionalPrinterColumns` for its kinds;
- custom resources use their CRD's printer columns (JSONPath of the `.a.b`, `.a[0].b` and
  `.a[?(@.k=='v')].b` forms), or NAME AGE when the CRD has none, as the apiextensions server does;
- ages are computed against the cluster clock (`now`) in kubectl's duration format (5s, 3m12s, 2d4h);
- every row carries a PartialObjectMetadata with the object's metadata (NAMESPACE and `-L` columns need it).

Pure functions over raw objects: no I/O, no clock reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from simulator.resources import ResourceType

Obj = dict[str, Any]
Cells = list[Any]

TABLE_API_VERSION = "meta.k8s.io/v1"
_NAME_DESC = ("Name must be unique within a namespace. Is required when creating resources, although some "
              "resources may allow a client to request the generation of an appropriate name automatically.")
_AGE_DESC = ("CreationTimestamp is a timestamp representing the server time when this object was created.")


@dataclass(frozen=True)
class PrinterColumn:
    """One `additionalPrinterColumns` entry of a CRD version."""

    name: str
    type: str
    json_path: str
    priority: int = 0
    description: str = ""
    format: str = ""

    def definition(self) -> Obj:
        return {"name": self.name, "type": self.type, "format": self.format,
                "description": self.description or
                f"Custom resource definition column (in JSONPath format): {self.json_path}",
                "priority": self.priority}


def _col(name: str, ctype: str = "string", *, priority: int = 0, fmt: str = "", desc: str = "") -> Obj:
    return {"name": name, "type": ctype, "format": fmt, "description": desc, "priority": priority}


NAME_COLUMN = _col("Name", fmt="name", desc=_NAME_DESC)
AGE_COLUMN = _col("Age", desc=_AGE_DESC)

_AGE_PATH = ".metadata.creationTimestamp"
# KubeVirt's CRD printer columns (virt-operator components/crds.go).
KUBEVIRT_COLUMNS: dict[str, tuple[PrinterColumn, ...]] = {
    "kubevirt.io/virtualmachineinstances": (
        PrinterColumn("Age", "date", _AGE_PATH),
        PrinterColumn("Phase", "string", ".status.phase"),
        PrinterColumn("IP", "string", ".status.interfaces[0].ipAddress"),
        PrinterColumn("NodeName", "string", ".status.nodeName"),
        PrinterColumn("Ready", "string", ".status.conditions[?(@.type=='Ready')].status"),
        PrinterColumn("Live-Migratable", "string", ".status.conditions[?(@.type=='LiveMigratable')].status",
                      priority=1),
        PrinterColumn("Paused", "string", ".status.conditions[?(@.type=='Paused')].status", priority=1),
    ),
    "kubevirt.io/virtualmachines": (
        PrinterColumn("Age", "date", _AGE_PATH),
        PrinterColumn("Status", "string", ".status.printableStatus", description="Human Readable Status"),
        PrinterColumn("Ready", "string", ".status.conditions[?(@.type=='Ready')].status"),
    ),
    "kubevirt.io/virtualmachineinstancemigrations": (
        PrinterColumn("Phase", "string", ".status.phase",
                      description="The current phase of VM instance migration"),
        PrinterColumn("VMI", "string", ".spec.vmiName",
                      description="The name of the VMI to perform the migration on"),
    ),
    "kubevirt.io/kubevirts": (
        PrinterColumn("Age", "date", _AGE_PATH),
        PrinterColumn("Phase", "string", ".status.phase"),
    ),
}
# What the apiextensions server defaults a CRD's printer columns to when it declares none.
DEFAULT_CR_COLUMNS = (PrinterColumn("Age", "date", _AGE_PATH),)


# ------------------------------------------------------------------------------------------------- time
def human_duration(seconds: float) -> str:
    """kubectl's `duration.HumanDuration`."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        rest = secs % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = secs // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


@lru_cache(maxsize=65536)
def _parse_ts(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


def since(ts: Any, now: float) -> str:
    """kubectl's `translateTimestampSince`: the age of a timestamp, or <unknown>."""
    if not isinstance(ts, str) or not ts:
        return "<unknown>"
    parsed = _parse_ts(ts)
    if parsed is None:
        return "<invalid>"
    return human_duration(now - parsed)


# ---------------------------------------------------------------------------------------------- jsonpath
_TOKEN_RE = re.compile(r"""\.([A-Za-z0-9_\-$]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*['"]([^'"]*)['"]\)\]"""
                       r"""|\[['"]([^'"]+)['"]\]""")
_MISSING = object()


@lru_cache(maxsize=1024)
def _compile_path(path: str) -> tuple[tuple[str, Any, Any], ...] | None:
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("$"):
        text = text[1:]
    steps: list[tuple[str, Any, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            return None
        field, index, fkey, fval, quoted = m.groups()
        if field is not None or quoted is not None:
            steps.append(("field", field if field is not None else quoted, None))
        elif index is not None:
            steps.append(("index", int(index), None))
        else:
            steps.append(("filter", tuple(fkey.split(".")), fval))
        pos = m.end()
    return tuple(steps)


def jsonpath_value(obj: Any, path: str) -> Any:
    """The first value `path` selects in `obj`, or None when it selects nothing (or is unsupported)."""
    steps = _compile_path(path)
    if steps is None:
        return None
    cur: Any = obj
    for kind, arg, value in steps:
        if kind == "field":
            cur = cur.get(arg, _MISSING) if isinstance(cur, dict) else _MISSING
        elif kind == "index":
            cur = cur[arg] if isinstance(cur, list) and -len(cur) <= arg < len(cur) else _MISSING
        else:
            if not isinstance(cur, list):
                return None
            cur = next((item for item in cur if _filter_match(item, arg, value)), _MISSING)
        if cur is _MISSING:
            return None
    return cur


def _filter_match(item: Any, keys: tuple[str, ...], value: str) -> bool:
    cur = item
    for key in keys:
        if not isinstance(cur, dict):
            return False
        cur = cur.get(key)
    return isinstance(cur, str) and cur == value


def _go_print(value: Any) -> str:
    """How client-go's jsonpath prints a value into a string column."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _cell_for(column: PrinterColumn, obj: Obj, now: float) -> Any:
    value = jsonpath_value(obj, column.json_path)
    if value is None:
        return None
    if column.type == "string":
        return _go_print(value)
    if column.type == "integer":
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if column.type == "number":
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if column.type == "boolean":
        return value if isinstance(value, bool) else None
    if column.type == "date":
        return since(value, now) if isinstance(value, str) else None
    return None


def columns_from_crd_version(version: Obj) -> tuple[PrinterColumn, ...]:
    """The printer columns of one `spec.versions[]` entry of a CRD (apiextensions defaulting applied)."""
    raw = version.get("additionalPrinterColumns") or []
    cols = tuple(
        PrinterColumn(name=str(c.get("name", "")), type=str(c.get("type", "string")),
                      json_path=str(c.get("jsonPath", "")), priority=int(c.get("priority") or 0),
                      description=str(c.get("description") or ""), format=str(c.get("format") or ""))
        for c in raw if isinstance(c, dict)
    )
    return cols or DEFAULT_CR_COLUMNS


# ----------------------------------------------------------------------------------------- built-in printers
def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _age(obj: Obj, now: float) -> str:
    return since(_meta(obj).get("creationTimestamp"), now)


def _labels_string(labels: Any) -> str:
    if not isinstance(labels, dict) or not labels:
        return "<none>"
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _selector_string(selector: Any) -> str:
    if not isinstance(selector, dict):
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts) if parts else "<none>"


NODE_COLUMNS = [
    NAME_COLUMN,
    _col("Status", desc="The status of the node"),
    _col("Roles", desc="The roles of the node"),
    AGE_COLUMN,
    _col("Version", desc="Kubelet Version reported by the node."),
    _col("Internal-IP", priority=1, desc="List of addresses reachable to the node. Queried from cloud provider, "
                                         "if available."),
    _col("External-IP", priority=1, desc="List of addresses reachable to the node. Queried from cloud provider, "
                                         "if available."),
    _col("OS-Image", priority=1, desc="OS Image reported by the node from /etc/os-release (e.g. Debian "
                                      "GNU/Linux 7 (wheezy))."),
    _col("Kernel-Version", priority=1, desc="Kernel Version reported by the node from 'uname -r' (e.g. "
                                            "3.16.0-0.bpo.4-amd64)."),
    _col("Container-Runtime", priority=1, desc="ContainerRuntime Version reported by the node through runtime "
                                               "remote API (e.g. containerd://1.4.2)."),
]


def node_status(obj: Obj) -> str:
    """The STATUS cell kubectl prints for a node."""
    status: list[str] = []
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            status.append("Ready" if cond.get("status") == "True" else "NotReady")
            break
    if not status:
        status.append("Unknown")
    if (obj.get("spec") or {}).get("unschedulable"):
        status.append("SchedulingDisabled")
    return ",".join(status)


def _node_roles(labels: dict[str, str]) -> str:
    roles: set[str] = set()
    for key, value in labels.items():
        if key.startswith("node-role.kubernetes.io/"):
            role = key[len("node-role.kubernetes.io/"):]
            if role:
                roles.add(role)
        elif key == "kubernetes.io/role" and value:
            roles.add(value)
    return ",".join(sorted(roles)) or "<none>"


def _print_node(obj: Obj, now: float) -> Cells:
    status = obj.get("status") or {}
    info = status.get("nodeInfo") or {}
    addresses = status.get("addresses") or []

    def address(kind: str) -> str:
        return next((a.get("address", "") for a in addresses if a.get("type") == kind), "") or "<none>"

    return [_meta(obj).get("name", ""), node_status(obj), _node_roles(_meta(obj).get("labels") or {}),
            _age(obj, now), info.get("kubeletVersion", ""), address("InternalIP"), address("ExternalIP"),
            info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>"]


POD_COLUMNS = [
    NAME_COLUMN,
    _col("Ready", desc="The aggregate readiness state of this pod for accepting traffic."),
    _col("Status", desc="The aggregate status of the containers in this pod."),
    _col("Restarts", desc="The number of times the containers in this pod have been restarted and when the "
                          "last container in this pod has restarted."),
    AGE_COLUMN,
    _col("IP", priority=1, desc="IP address allocated to the pod. Routable at least within the cluster. Empty "
                                "if not yet allocated."),
    _col("Node", priority=1, desc="NodeName is a request to schedule this pod onto a specific node."),
    _col("Nominated Node", priority=1, desc="nominatedNodeName is set when this pod preempts other pods on the "
                                            "node, but it cannot be scheduled right away as preemption victims "
                                            "receive their graceful termination periods."),
    _col("Readiness Gates", priority=1, desc="If specified, all readiness gates will be evaluated for pod "
                                             "readiness."),
]


def _print_pod(obj: Obj, now: float) -> Cells:
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    total = len(spec.get("containers") or [])
    ready = 0
    restarts = 0
    last_restart: float | None = None
    reason = status.get("reason") or status.get("phase") or ""
    has_running = False
    for cs in reversed(status.get("containerStatuses") or []):
        restarts += int(cs.get("restartCount") or 0)
        finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        if isinstance(finished, str) and (parsed := _parse_ts(finished)) is not None:
            last_restart = parsed if last_restart is None else max(last_restart, parsed)
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
        elif terminated and terminated.get("reason"):
            reason = terminated["reason"]
        elif terminated:
            reason = (f"Signal:{terminated['signal']}" if terminated.get("signal")
                      else f"ExitCode:{terminated.get('exitCode', 0)}")
        elif cs.get("ready") and "running" in state:
            has_running = True
            ready += 1
    if reason == "Completed" and has_running:
        ready_cond = any(c.get("type") == "Ready" and c.get("status") == "True"
                         for c in status.get("conditions") or [])
        reason = "Running" if ready_cond else "NotReady"
    if meta.get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    restarts_cell = str(restarts)
    if restarts and last_restart is not None:
        restarts_cell = f"{restarts} ({human_duration(now - last_restart)} ago)"
    pod_ips = status.get("podIPs") or []
    pod_ip = (pod_ips[0].get("ip") if pod_ips else status.get("podIP")) or "<none>"
    gates = spec.get("readinessGates") or []
    if gates:
        conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        gates_cell = f"{sum(1 for g in gates if conds.get(g.get('conditionType')) == 'True')}/{len(gates)}"
    else:
        gates_cell = "<none>"
    return [meta.get("name", ""), f"{ready}/{total}", reason, restarts_cell, _age(obj, now),
            pod_ip, spec.get("nodeName") or "<none>", status.get("nominatedNodeName") or "<none>", gates_cell]


NAMESPACE_COLUMNS = [NAME_COLUMN, _col("Status", desc="The status of the namespace"), AGE_COLUMN]


def _print_namespace(obj: Obj, now: float) -> Cells:
    return [_meta(obj).get("name", ""), (obj.get("status") or {}).get("phase", ""), _age(obj, now)]


EVENT_COLUMNS = [
    _col("Last Seen", desc="The time at which the most recent occurrence of this event was recorded."),
    _col("Type", desc="Type of this event (Normal, Warning), new types could be added in the future"),
    _col("Reason", desc="This should be a short, machine understandable string that gives the reason for the "
                        "transition into the object's current status."),
    _col("Object", desc="The object that this event is about."),
    _col("Subobject", priority=1, desc="If referring to a piece of an object instead of an entire object, this "
                                       "string should contain a valid JSON/Go field access statement."),
    _col("Source", priority=1, desc="The component reporting this event. Should be a short machine "
                                    "understandable string."),
    _col("Message", desc="A human-readable description of the status of this operation."),
    _col("First Seen", priority=1, desc="The time at which the event was first recorded."),
    _col("Count", priority=1, desc="The number of times this event has occurred."),
    _col("Name", priority=1, fmt="name", desc=_NAME_DESC),
]


def _print_event(obj: Obj, now: float) -> Cells:
    first = since(obj.get("firstTimestamp"), now)
    if not obj.get("firstTimestamp"):
        first = since(obj.get("eventTime"), now)
    last = since(obj.get("lastTimestamp"), now) if obj.get("lastTimestamp") else first
    count = int(obj.get("count") or 0)
    series = obj.get("series")
    if isinstance(series, dict):
        last = since(series.get("lastObservedTime"), now)
        count = int(series.get("count") or 0)
    elif count == 0:
        count = 1
    involved = obj.get("involvedObject") or {}
    kind = str(involved.get("kind") or "").lower()
    target = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = obj.get("source") or {}
    component = source.get("component") or obj.get("reportingComponent") or ""
    host = source.get("host") or obj.get("reportingInstance") or ""
    source_cell = f"{component}, {host}" if host else component
    return [last, obj.get("type", ""), obj.get("reason", ""), target, involved.get("fieldPath", ""),
            source_cell, str(obj.get("message", "")).strip(), first, count, _meta(obj).get("name", "")]


DAEMONSET_COLUMNS = [
    NAME_COLUMN,
    _col("Desired", "integer", desc="The total number of nodes that should be running the daemon pod."),
    _col("Current", "integer", desc="The number of nodes that are running at least 1 daemon pod."),
    _col("Ready", "integer", desc="The number of nodes that should be running the daemon pod and have one or "
                                  "more of the daemon pod running and ready."),
    _col("Up-to-date", "integer", desc="The total number of nodes that are running updated daemon pod"),
    _col("Available", "integer", desc="The number of nodes that should be running the daemon pod and have one "
                                      "or more of the daemon pod running and available."),
    _col("Node Selector", desc="NodeSelector is a selector which must be true for the pod to fit on a node."),
    AGE_COLUMN,
    _col("Containers", priority=1, desc="Names of each container in the template."),
    _col("Images", priority=1, desc="Images referenced by each container in the template."),
    _col("Selector", priority=1, desc="A label query over pods that are managed by the daemon set."),
]


def _print_daemonset(obj: Obj, now: float) -> Cells:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    containers = pod_spec.get("containers") or []
    return [_meta(obj).get("name", ""), int(status.get("desiredNumberScheduled") or 0),
            int(status.get("currentNumberScheduled") or 0), int(status.get("numberReady") or 0),
            int(status.get("updatedNumberScheduled") or 0), int(status.get("numberAvailable") or 0),
            _labels_string(pod_spec.get("nodeSelector")), _age(obj, now),
            ",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers),
            _selector_string(spec.get("selector"))]


PDB_COLUMNS = [
    NAME_COLUMN,
    _col("Min Available", desc="The minimum number of pods that must be available simultaneously. This can be "
                               "either an integer or a string specifying a percentage, e.g. \"28%\"."),
    _col("Max Unavailable", desc="The maximum number of pods that may be unavailable simultaneously. This can "
                                 "be either an integer or a string specifying a percentage, e.g. \"28%\"."),
    _col("Allowed Disruptions", "integer", desc="Calculated number of pods that may be disrupted at this time."),
    AGE_COLUMN,
]


def _print_pdb(obj: Obj, now: float) -> Cells:
    spec = obj.get("spec") or {}
    min_available = spec.get("minAvailable")
    max_unavailable = spec.get("maxUnavailable")
    return [_meta(obj).get("name", ""), "N/A" if min_available is None else str(min_available),
            "N/A" if max_unavailable is None else str(max_unavailable),
            int((obj.get("status") or {}).get("disruptionsAllowed") or 0), _age(obj, now)]


LEASE_COLUMNS = [NAME_COLUMN, _col("Holder", desc="The holder of the lease"), AGE_COLUMN]


def _print_lease(obj: Obj, now: float) -> Cells:
    return [_meta(obj).get("name", ""), (obj.get("spec") or {}).get("holderIdentity") or "", _age(obj, now)]


CRD_COLUMNS = [NAME_COLUMN, _col("Created At", "date", desc=_AGE_DESC)]


def _print_crd(obj: Obj, now: float) -> Cells:
    return [_meta(obj).get("name", ""), _meta(obj).get("creationTimestamp")]


Printer = Callable[[Obj, float], Cells]
BUILTIN_PRINTERS: dict[str, tuple[list[Obj], Printer]] = {
    "nodes": (NODE_COLUMNS, _print_node),
    "pods": (POD_COLUMNS, _print_pod),
    "namespaces": (NAMESPACE_COLUMNS, _print_namespace),
    "events": (EVENT_COLUMNS, _print_event),
    "apps/daemonsets": (DAEMONSET_COLUMNS, _print_daemonset),
    "policy/poddisruptionbudgets": (PDB_COLUMNS, _print_pdb),
    "coordination.k8s.io/leases": (LEASE_COLUMNS, _print_lease),
    "apiextensions.k8s.io/customresourcedefinitions": (CRD_COLUMNS, _print_crd),
}


# -------------------------------------------------------------------------------------------------- tables
def wants_table(accept: str | None) -> bool:
    """Whether an Accept header asks for a meta.k8s.io Table (kubectl get does, before plain JSON)."""
    if not accept:
        return False
    for part in accept.split(","):
        params = {p.split("=", 1)[0].strip(): p.split("=", 1)[1].strip()
                  for p in part.split(";")[1:] if "=" in p}
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
            return True
    return False


def partial_metadata(obj: Obj) -> Obj:
    return {"kind": "PartialObjectMetadata", "apiVersion": TABLE_API_VERSION, "metadata": _meta(obj)}


class TableRenderer:
    """Turns raw objects of a kind into a Table; remembers the printer columns CRDs declare."""

    def __init__(self) -> None:
        self._custom: dict[str, tuple[PrinterColumn, ...]] = dict(KUBEVIRT_COLUMNS)

    def set_columns(self, rt_key: str, columns: tuple[PrinterColumn, ...]) -> None:
        self._custom[rt_key] = columns

    def drop_columns(self, rt_key: str) -> None:
        self._custom.pop(rt_key, None)
        if rt_key in KUBEVIRT_COLUMNS:
            self._custom[rt_key] = KUBEVIRT_COLUMNS[rt_key]

    def column_definitions(self, rt: ResourceType) -> list[Obj]:
        builtin = BUILTIN_PRINTERS.get(rt.key)
        if builtin is not None:
            return builtin[0]
        return [NAME_COLUMN, *(c.definition() for c in self._custom.get(rt.key, DEFAULT_CR_COLUMNS))]

    def row_cells(self, rt: ResourceType, obj: Obj, now: float) -> Cells:
        builtin = BUILTIN_PRINTERS.get(rt.key)
        if builtin is not None:
            return builtin[1](obj, now)
        cols = self._custom.get(rt.key, DEFAULT_CR_COLUMNS)
        return [_meta(obj).get("name", ""), *(_cell_for(c, obj, now) for c in cols)]

    def table(self, rt: ResourceType, objs: Iterable[Obj], *, now: float, resource_version: str,
              include_object: str = "Metadata") -> Obj:
        """A Table of `objs`; `include_object` is the request's includeObject (None|Metadata|Object)."""
        rows = []
        for obj in objs:
            row: Obj = {"cells": self.row_cells(rt, obj, now)}
            if include_object == "Object":
                row["object"] = obj
            elif include_object != "None":
                row["object"] = partial_metadata(obj)
            rows.append(row)
        return {"kind": "Table", "apiVersion": TABLE_API_VERSION,
                "metadata": {"resourceVersion": resource_version},
                "columnDefinitions": self.column_definitions(rt), "rows": rows}
