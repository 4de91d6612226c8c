"""Which rungs of the escalation ladder a drain and a VM's annotations allow (orchestrator.escalation)."""

from __future__ import annotations

import pytest

from orchestrator.escalation import Rung, allowed_rungs, drain_rungs, parse_escalation, rung_names
from orchestrator.model import DrainRequest

S, A, P = Rung.SOLO, Rung.AUTO_CONVERGE, Rung.POST_COPY


@pytest.mark.parametrize(("value", "expect"), [
    ("solo", ("solo",)),
    ("post-copy, solo", ("solo", "post-copy")),              # ladder order, spaces ignored
    ("AUTO-CONVERGE,solo,solo", ("solo", "auto-converge")),
    (["post-copy"], ("post-copy",)),
    ("none", ()),
    (" None ", ()),
])
def test_escalation_names_parse_in_ladder_order(value: str | list[str], expect: tuple[str, ...]) -> None:
    assert parse_escalation(value, where="x") == expect


@pytest.mark.parametrize(("value", "message"), [
    ("fast", r"x: unknown rung\(s\) 'fast'; expected a comma-separated list of solo, auto-converge, post-copy, "
             r"or none"),
    ("", "x: empty"),
    (" , ", "x: empty"),
    ("none,solo", "x: 'none' cannot be combined with rungs"),
    (3, "x: expected a comma-separated list"),
])
def test_bad_escalation_values_name_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_escalation(value, where="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("escalation", "post_copy", "expect"), [
    (None, False, {S, A}),                # the default: solo and auto-converge, never post-copy
    (None, True, {S, A, P}),              # --allow-post-copy adds post-copy
    (("solo",), False, {S}),
    (("post-copy",), False, {P}),
    ((), False, set()),                   # none
    ((), True, {P}),
])
def test_what_a_drain_allows(escalation: tuple[str, ...] | None, post_copy: bool, expect: set[Rung]) -> None:
    assert drain_rungs(escalation, allow_post_copy=post_copy) == expect


@pytest.mark.parametrize(("escalation", "post_copy", "namespace", "vmi", "expect"), [
    (None, False, None, None, {S, A}),
    (None, False, "none", None, set()),                      # the namespace narrows
    (None, False, None, "none", set()),                      # so does the VMI
    (None, False, "solo,auto-converge", "auto-converge", {A}),  # the intersection
    (None, True, "solo", None, {S}),                         # the namespace does not list post-copy: narrowed out
    (None, False, "solo,post-copy", None, {S, P}),           # a namespace opts its VMs in to post-copy
    (None, False, None, "post-copy", {P}),                   # and so may a VMI
    (None, False, "post-copy", "solo", set()),               # the VMI narrows the namespace's opt-in
    ((), False, "solo,post-copy", "post-copy", set()),       # the drain said none: nothing turns it back on
    (("solo",), False, "auto-converge", None, set()),
])
def test_annotations_narrow_what_the_drain_allows(escalation: tuple[str, ...] | None, post_copy: bool,
                                                  namespace: str | None, vmi: str | None, expect: set[Rung]) -> None:
    assert allowed_rungs(escalation, allow_post_copy=post_copy, namespace_annotation=namespace,
                         vmi_annotation=vmi, namespace="web", vmi="web/a") == expect


def test_a_bad_annotation_names_where_it_is() -> None:
    with pytest.raises(ValueError, match=r"annotation drainctl\.io/escalation on namespace web: unknown rung"):
        allowed_rungs(None, allow_post_copy=False, namespace_annotation="turbo", vmi_annotation=None,
                      namespace="web", vmi="web/a")
    with pytest.raises(ValueError, match="on VMI web/a: 'none' cannot be combined"):
        allowed_rungs(None, allow_post_copy=False, namespace_annotation=None, vmi_annotation="none,solo",
                      namespace="web", vmi="web/a")


def test_rung_names_read_as_users_write_them() -> None:
    assert rung_names({P, S}) == "solo,post-copy"
    assert rung_names(()) == "none"


@pytest.mark.parametrize(("body", "expect"), [
    ({"escalation": "solo,post-copy"}, ("solo", "post-copy")),
    ({"escalation": ["auto-converge"]}, ("auto-converge",)),
    ({"escalation": "none"}, ()),
    ({"escalation": []}, ()),
    ({}, None),
])
def test_the_drain_request_carries_the_escalation(body: dict[str, object], expect: tuple[str, ...] | None) -> None:
    request = DrainRequest.from_json({"nodes": ["n1"], **body})
    assert request.escalation == expect
    assert DrainRequest.from_json(request.to_json()) == request


def test_a_drain_request_with_a_bad_escalation_names_the_field() -> None:
    with pytest.raises(ValueError, match="drain request: escalation: unknown rung"):
        DrainRequest.from_json({"nodes": ["n1"], "escalation": "solo,warp"})
