"""The ClusterRole (plus the leader-election Role) grants exactly the API calls the code makes.

The calls are derived from the source, not listed by hand: every module of `orchestrator/` and `workers/` is
parsed, every `Kind` constant resolved (kube.py's list, and any module's own `Kind(...)` or
`status_subresource(...)`), and every call of a cluster-adapter method on such a constant mapped to RBAC verbs
by `METHOD_VERBS`. A new call in kube.py or any caller that the role lacks fails `test_every_call_is_granted`;
a grant no code uses fails `test_nothing_is_granted_beyond_the_calls`. A call whose resource cannot be resolved
statically fails `test_every_cluster_call_is_resolvable`, so the derivation cannot silently miss one.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

from orchestrator.controller import KOPF_GRANTS

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("orchestrator/*.py"), *ROOT.glob("workers/**/*.py")])
RBAC = ROOT / "k8s" / "rbac.yaml"

METHOD_VERBS: dict[str, tuple[str, ...]] = {
    "get": ("get",),
    "find": ("get",),
    "list": ("list",),
    "watch": ("list", "watch"),  # Kube.watch lists, then watches
    "create": ("create",),
    "patch": ("patch",),
    "annotate": ("patch",),
    "delete": ("delete",),
}
"""Kube methods that take a Kind as first argument -> the verbs they need."""
HTTP_VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
KUBE_RECEIVERS = ("kube", "self")
"""Receivers that are (or, inside kube.py, are) the cluster adapter."""

Grant = tuple[str, str, str]  # (api group, resource[/subresource], verb)


def _literal(node: ast.expr | None, default: Any) -> Any:
    return default if node is None else ast.literal_eval(node)


def _kind_args(call: ast.Call) -> tuple[str, str]:
    """(group, plural) of a `Kind(plural, group="", version="v1", namespaced=True)` call."""
    params = ["plural", "group", "version", "namespaced"]
    values: dict[str, ast.expr] = dict(zip(params, call.args, strict=False))
    values.update({kw.arg: kw.value for kw in call.keywords if kw.arg})
    group = values.get("group")
    if isinstance(group, ast.Starred):
        # Kind("...", *KUBEVIRT): the tuple constant ("kubevirt.io", "v1") from kube.py.
        return "kubevirt.io", str(_literal(values["plural"], ""))
    return str(_literal(group, "")), str(_literal(values["plural"], ""))


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _const_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def kinds() -> dict[str, tuple[str, str]]:
    """Every module-level Kind constant: name -> (group, resource)."""
    found: dict[str, tuple[str, str]] = {}
    pending: list[tuple[str, str]] = []
    for path in SOURCES:
        for stmt in ast.parse(path.read_text()).body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Call)):
                continue
            name, call = stmt.targets[0].id, stmt.value
            if _callee(call) == "Kind":
                value = _kind_args(call)
                assert found.get(name, value) == value, f"{name} names two different kinds"
                found[name] = value
            elif _callee(call) == "status_subresource":
                base = _const_name(call.args[0])
                assert base is not None, f"{path.name}: {name}: status_subresource of an expression"
                pending.append((name, base))
    for name, base in pending:
        group, plural = found[base]
        found[name] = (group, f"{plural}/status")
    return found


def derived_calls() -> tuple[set[Grant], list[str]]:
    """(grants the code needs, calls that could not be resolved)."""
    table = kinds()
    needed: set[Grant] = set()
    unresolved: list[str] = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            method = node.func.attr
            receiver = ast.unparse(node.func.value)
            if method == "_call" and node.args:
                # A raw request: _call("POST", PODS.path(ns, name, "eviction")).
                http = _literal(node.args[0], None)
                target = node.args[1] if len(node.args) > 1 else None
                if isinstance(target, ast.Call) and _callee(target) == "path" and \
                        isinstance(target.func, ast.Attribute):
                    kind = _const_name(target.func.value)
                    sub = _literal(target.args[2], None) if len(target.args) > 2 else None
                    if kind in table and isinstance(http, str):
                        group, plural = table[kind]
                        needed.add((group, f"{plural}/{sub}" if sub else plural, HTTP_VERBS[http]))
                # Otherwise it is Kube's generic layer, whose callers are counted where they call it.
                continue
            if method not in METHOD_VERBS or not node.args:
                continue
            if not any(word in receiver for word in KUBE_RECEIVERS):
                continue
            first = node.args[0]
            kind = _const_name(first)
            if kind in table:
                group, resource = table[kind]
                needed.update((group, resource, verb) for verb in METHOD_VERBS[method])
            elif "kube" in receiver and path.name != "kube.py":
                unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    # The DrainRequest controller's watch, finalizer, annotation and status writes are kopf's own requests,
    # declared beside the code that starts kopf.
    needed.update(KOPF_GRANTS)
    return needed, unresolved


def granted() -> set[Grant]:
    grants: set[Grant] = set()
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        grants.update((group, resource, verb) for verb in rule["verbs"])
    return grants


def test_the_derivation_finds_the_known_calls() -> None:
    # Guards the parser itself: if it stopped seeing calls, the two set comparisons below would pass vacuously.
    needed, _ = derived_calls()
    for call in [("", "pods/eviction", "create"), ("kubevirt.io", "virtualmachineinstancemigrations", "create"),
                 ("kubevirt.io", "virtualmachineinstancemigrations", "delete"), ("", "nodes", "patch"),
                 ("", "events", "create"), ("kubevirt.io", "kubevirts", "list"),
                 ("coordination.k8s.io", "leases", "patch"), ("drainctl.io", "drainrequests/status", "patch")]:
        assert call in needed


def test_every_cluster_call_is_resolvable() -> None:
    _, unresolved = derived_calls()
    assert unresolved == []


def test_every_call_is_granted() -> None:
    needed, _ = derived_calls()
    missing = sorted(needed - granted())
    assert missing == [], f"the code calls these but k8s/rbac.yaml does not grant them: {missing}"


def test_nothing_is_granted_beyond_the_calls() -> None:
    needed, _ = derived_calls()
    extra = sorted(granted() - needed)
    assert extra == [], f"k8s/rbac.yaml grants these but no code calls them: {extra}"


def test_no_wildcards_and_leases_only_in_the_namespace() -> None:
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if not doc or doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            if "leases" in rule["resources"]:
                assert doc["kind"] == "Role", "leader election needs one namespace, not the whole cluster"
