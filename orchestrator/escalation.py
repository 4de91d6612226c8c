"""Which rungs of the escalation ladder a VM's next attempt may use: the drain's choice, narrowed per namespace
and per VM by the `drainctl.io/escalation` annotation.

The ladder, in order (each rung only after an attempt judged CannotConverge, see workers.jobs.ladder):
plain -> solo (the VM migrates alone on its source and target NICs) -> auto-converge (CPU throttling for this
VM only) -> post-copy (opt-in) -> stop and report.

The rules (pure, table-tested in tests/orchestrator/test_escalation.py):

- The drain allows `escalation` (a list of rung names; None: the default, solo and auto-converge) plus
  post-copy when `allow_post_copy` is set. `none` (an empty list, without `allow_post_copy`) turns the ladder
  off for the drain: no annotation turns it back on.
- An annotation `drainctl.io/escalation` on the VMI's namespace or on the VMI (a comma list of rung names, or
  `none`) narrows what the drain allows: solo and auto-converge need the drain and every annotation present.
- Post-copy is opt-in: it needs every annotation present to list it, and the drain's opt-in or an annotation
  that lists it (a namespace or VM owner may opt in where the drain does not).

Bad values raise ValueError naming where the value came from, the value and what is accepted. It must stay
pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_ESCALATION", "ESCALATION_ANNOTATION", "LADDER", "NONE", "Rung", "allowed_rungs",
           "drain_rungs", "parse_escalation", "rung_names"]

ESCALATION_ANNOTATION = "drainctl.io/escalation"
"""On a VMI or its namespace: the rungs its migrations may escalate to (comma list, or `none`)."""
NONE = "none"


class Rung(enum.StrEnum):
    """A rung of the ladder; the value is what attempt records and reports show."""

    SOLO = "Solo"
    AUTO_CONVERGE = "AutoConverge"
    POST_COPY = "PostCopy"

    @property
    def option(self) -> str:
        """The name users write (CLI, API, DrainRequest, annotation)."""
        return _OPTIONS[self]


_OPTIONS = {Rung.SOLO: "solo", Rung.AUTO_CONVERGE: "auto-converge", Rung.POST_COPY: "post-copy"}
_BY_OPTION = {name: rung for rung, name in _OPTIONS.items()}
LADDER: tuple[Rung, ...] = (Rung.SOLO, Rung.AUTO_CONVERGE, Rung.POST_COPY)
DEFAULT_ESCALATION: tuple[str, ...] = ("solo", "auto-converge")
_ACCEPTED = f"a comma-separated list of {', '.join(_OPTIONS.values())}, or {NONE}"


def parse_escalation(value: str | Sequence[str], *, where: str = "") -> tuple[str, ...]:
    """The rung names of `value` (a comma list or a list of names) in ladder order; () for `none`.

    Raises ValueError naming `where` (e.g. "drain request: escalation", "annotation drainctl.io/escalation on
    namespace web"; nothing when empty) when a name is unknown, the list is empty or `none` comes with others."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence) and all(isinstance(part, str) for part in value):
        parts = [part.strip() for part in value]
    else:
        raise ValueError(f"{prefix}expected {_ACCEPTED}, got {value!r}")
    names = [part.lower() for part in parts if part]
    if not names:
        raise ValueError(f"{prefix}empty; expected {_ACCEPTED}")
    if NONE in names:
        if len(set(names)) > 1:
            raise ValueError(f"{prefix}{NONE!r} cannot be combined with rungs ({', '.join(parts)})")
        return ()
    unknown = [name for name in names if name not in _BY_OPTION]
    if unknown:
        raise ValueError(f"{prefix}unknown rung(s) {', '.join(repr(u) for u in unknown)}; expected {_ACCEPTED}")
    chosen = {_BY_OPTION[name] for name in names}
    return tuple(rung.option for rung in LADDER if rung in chosen)


def rung_names(rungs: Iterable[Rung]) -> str:
    """The rungs as users write them, in ladder order ("none" when empty)."""
    chosen = set(rungs)
    return ",".join(rung.option for rung in LADDER if rung in chosen) or NONE


def drain_rungs(escalation: Sequence[str] | None, *, allow_post_copy: bool) -> frozenset[Rung]:
    """The rungs a drain allows: its `escalation` names (None: the default), plus post-copy if opted in."""
    names = DEFAULT_ESCALATION if escalation is None else escalation
    rungs = {_BY_OPTION[name] for name in names}
    if allow_post_copy:
        rungs.add(Rung.POST_COPY)
    return frozenset(rungs)


def allowed_rungs(escalation: Sequence[str] | None, *, allow_post_copy: bool, namespace_annotation: str | None,
                  vmi_annotation: str | None, namespace: str, vmi: str) -> frozenset[Rung]:
    """The rungs one VM may use: the drain's, narrowed by the annotations of its namespace and of the VMI
    (None: not annotated). Raises ValueError naming the annotation whose value is bad."""
    drain = drain_rungs(escalation, allow_post_copy=allow_post_copy)
    notes = [(f"annotation {ESCALATION_ANNOTATION} on namespace {namespace}", namespace_annotation),
             (f"annotation {ESCALATION_ANNOTATION} on VMI {vmi}", vmi_annotation)]
    present = [frozenset(_BY_OPTION[n] for n in parse_escalation(value, where=where))
               for where, value in notes if value is not None]
    if not drain:
        return frozenset()
    allowed: set[Rung] = {rung for rung in drain if rung is not Rung.POST_COPY and all(rung in p for p in present)}
    opted_in = Rung.POST_COPY in drain or any(Rung.POST_COPY in p for p in present)
    if opted_in and all(Rung.POST_COPY in p for p in present):
        allowed.add(Rung.POST_COPY)
    return frozenset(allowed)
