"""Label and field selectors, parsed once and matched against raw objects like the API server does."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from simulator.errors import ApiError

_SET_RE = re.compile(r"^\s*(!?)([A-Za-z0-9_./-]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin" match objects that lack the key, as in Kubernetes.
        return not present or labels[self.key] not in self.values


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    if not text:
        return ()
    reqs: list[Requirement] = []
    for part in _split_top(text):
        for op in ("!=", "==", "="):
            if op in part and "(" not in part:
                key, _, value = part.partition(op)
                reqs.append(Requirement(key.strip(), "!=" if op == "!=" else "=", (value.strip(),)))
                break
        else:
            m = _SET_RE.match(part)
            if not m:
                raise ApiError.bad_request(f"unable to parse requirement: {part!r}")
            neg, key, setop, values = m.groups()
            if setop:
                vals = tuple(v.strip() for v in values.split(",") if v.strip())
                reqs.append(Requirement(key, setop, vals))
            else:
                reqs.append(Requirement(key, "!exists" if neg else "exists"))
    return tuple(reqs)


def labels_match(reqs: tuple[Requirement, ...], labels: Mapping[str, str] | None) -> bool:
    lbl = labels or {}
    return all(r.matches(lbl) for r in reqs)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            cur = None
            break
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    value: str
    negate: bool

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return (field_value(obj, self.path) == self.value) != self.negate


def parse_field_selector(text: str | None, supported: tuple[str, ...]) -> tuple[FieldRequirement, ...]:
    if not text:
        return ()
    reqs: list[FieldRequirement] = []
    for part in _split_top(text):
        for op in ("!=", "==", "="):
            if op in part:
                key, _, value = part.partition(op)
                key = key.strip()
                if key not in supported:
                    raise ApiError.bad_request(f'field label not supported: {key}')
                reqs.append(FieldRequirement(key, value.strip(), op == "!="))
                break
        else:
            raise ApiError.bad_request(f"invalid selector: '{part}'; can't understand '{part}'")
    return tuple(reqs)


def fields_match(reqs: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    return all(r.matches(obj) for r in reqs)


def compile_filter(label_selector: str | None, field_selector: str | None,
                   supported_fields: tuple[str, ...]) -> Callable[[Mapping[str, Any]], bool] | None:
    """One predicate for both selectors, or None when there is nothing to filter."""
    lreqs = parse_label_selector(label_selector)
    freqs = parse_field_selector(field_selector, supported_fields)
    if not lreqs and not freqs:
        return None

    def pred(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return labels_match(lreqs, meta.get("labels")) and fields_match(freqs, obj)

    return pred
