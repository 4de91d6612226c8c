"""The escalation ladder's pure decisions (workers.jobs.ladder): the rung of the next attempt, and when to stop."""

from __future__ import annotations

import pytest

from orchestrator.escalation import Rung
from orchestrator.records import AttemptRecord, VmRecord
from workers.jobs.ladder import escalates, hopeless, next_rung

S, A, P = Rung.SOLO, Rung.AUTO_CONVERGE, Rung.POST_COPY
ALL = frozenset({S, A, P})
DEFAULT = frozenset({S, A})
CC = "CannotConverge"


def judged(attempt: int, rung: Rung | None, convergence: str | None = CC) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, rung=None if rung is None else rung.value, convergence=convergence,
                         dirty_rate=20e9, transfer_rate=2.5e9)


def vm_after(*entries: AttemptRecord, expected: Rung | None = None) -> VmRecord:
    return VmRecord(vmi="ns/hot", node="n1", attempt=len(entries) + 1, attempts=list(entries),
                    expected_rung=None if expected is None else expected.value)


@pytest.mark.parametrize(("expected", "allowed", "later", "expect"), [
    (None, ALL, None, None),                 # nothing expected: a plain first attempt
    (A, ALL, None, A),                       # the plan expects auto-converge: the first attempt starts there
    (P, DEFAULT, None, None),                # ... post-copy is not allowed: plain
    (S, frozenset({A}), None, None),         # ... solo is not allowed for this VM: plain, then the ladder
    (A, ALL, judged(1, A), P),               # judged unable to converge even there: on up from that rung
    (S, ALL, judged(1, S, "Converging"), S),  # failed otherwise: the same rung again
])
def test_the_first_attempt_starts_on_the_expected_rung(expected: Rung | None, allowed: frozenset[Rung],
                                                       later: AttemptRecord | None, expect: Rung | None) -> None:
    vm = vm_after(*([later] if later else []), expected=expected)
    assert next_rung(vm, vm.attempt, allowed) is expect


@pytest.mark.parametrize(("previous", "allowed", "expect"), [
    (None, ALL, None),                                     # the first attempt is plain
    (judged(1, None, None), ALL, None),                    # never judged (no metrics): plain again
    (judged(1, None, "Converging"), ALL, None),            # failed for another reason: plain again
    (judged(1, None), ALL, S),                             # plain -> solo
    (judged(1, S), ALL, A),                                # solo -> auto-converge
    (judged(1, A), ALL, P),                                # auto-converge -> post-copy
    (judged(1, P), ALL, None),                             # the top: nothing above
    (judged(1, None), DEFAULT, S),
    (judged(1, A), DEFAULT, None),                         # post-copy not allowed: stop
    (judged(1, None), frozenset({A}), A),                  # solo not allowed: straight to auto-converge
    (judged(1, None), frozenset({P}), P),
    (judged(1, None), frozenset(), None),                  # none
    (judged(1, S, "Converging"), ALL, S),                  # a solo attempt that failed otherwise: solo again
    (judged(1, A, None), frozenset({S}), None),            # ... unless that rung is no longer allowed
])
def test_the_rung_of_the_next_attempt(previous: AttemptRecord | None, allowed: frozenset[Rung],
                                      expect: Rung | None) -> None:
    vm = vm_after(previous) if previous is not None else vm_after()
    assert next_rung(vm, vm.attempt, allowed) is expect


@pytest.mark.parametrize(("entry", "allowed", "stop"), [
    (judged(1, None), DEFAULT, False),
    (judged(1, S), DEFAULT, False),
    (judged(1, A), DEFAULT, True),
    (judged(1, A), ALL, False),
    (judged(1, None), frozenset(), True),
    (judged(1, None, "Converging"), frozenset(), False),   # not judged hopeless: nothing to report
])
def test_when_the_ladder_stops(entry: AttemptRecord, allowed: frozenset[Rung], stop: bool) -> None:
    assert (hopeless(entry, allowed) is not None) is stop
    assert escalates(entry, allowed) is (entry.convergence == CC and not stop)


def test_the_report_has_the_numbers_and_what_would_make_it_move() -> None:
    text = hopeless(judged(1, None), frozenset())
    assert text is not None
    assert text.startswith("cannot converge: dirties 18.6 GiB/s, the network carries 2.3 GiB/s; it would move")
    assert "more than 18.6 GiB/s" in text and "dedicated migration network" in text
    assert "--escalation solo" in text and "--escalation auto-converge" in text and "--allow-post-copy" in text
    assert text.endswith("(rungs allowed for it: none)")


def test_the_report_of_the_last_rung_names_it_and_skips_rungs_tried() -> None:
    text = hopeless(judged(3, A), DEFAULT)
    assert text is not None
    assert text.startswith("cannot converge on the AutoConverge rung: dirties")
    assert "--escalation solo" not in text and "--allow-post-copy" in text


def test_the_report_names_a_bad_annotation() -> None:
    text = hopeless(judged(1, None), frozenset(), problem="annotation drainctl.io/escalation on VMI ns/hot: empty")
    assert text is not None and text.endswith("(annotation drainctl.io/escalation on VMI ns/hot: empty)")
