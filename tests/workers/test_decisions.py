"""The engine's decisions (workers.jobs.decisions), table by table: pure, no clock, no Redis, no cluster."""

from __future__ import annotations

import pytest

from orchestrator.model import FailureClass, NodePhase, VmPhase
from orchestrator.records import VmRecord
from workers.jobs.decisions import (
    Settle,
    capacity_verdict,
    classify,
    completion_budget_s,
    drain_verdict,
    feed_window,
    migration_timeout,
    migration_work_s,
    node_priorities,
    settle_attempt,
    wait_expired,
)

GIB = 1024**3


@pytest.mark.parametrize(("reason", "failure"), [
    ("Live migration is not completed after 750 seconds and has been aborted", FailureClass.NOT_CONVERGING),
    ("Live migration stuck for 150 sec and has been aborted", FailureClass.NOT_CONVERGING),
    # KubeVirt v1.9+: the launcher's timeouts, which we did not ask for, read like any successful abort.
    ("Live migration has been aborted", FailureClass.NOT_CONVERGING),
    ("Migration target pod was removed during active migration.", FailureClass.UNSCHEDULABLE),
    ("target pod is unschedulable", FailureClass.UNSCHEDULABLE),
    ("Migration failed due to being canceled", FailureClass.ABORTED),
    ("Live migration aborted ", FailureClass.ABORTED),
    ("vmi does not exist", FailureClass.VM_GONE),
    ("Live migration failed: connection reset", FailureClass.TARGET_FAILED),
    ("something new", FailureClass.UNKNOWN),
])
def test_kubevirt_failure_texts_map_to_classes(reason: str, failure: FailureClass) -> None:
    assert classify(reason) is failure


@pytest.mark.parametrize(("failure", "retryable", "avoid", "blames"), [
    (FailureClass.UNSCHEDULABLE, True, True, True),
    (FailureClass.TARGET_FAILED, True, True, True),
    (FailureClass.NOT_CONVERGING, True, True, False),
    (FailureClass.TIMEOUT, True, True, False),
    (FailureClass.UNKNOWN, True, True, False),
    (FailureClass.ABORTED, True, False, False),
    (FailureClass.REJECTED, False, True, False),
    (FailureClass.CONFLICT, False, True, False),
    (FailureClass.VM_GONE, False, True, False),
])
def test_which_failures_retry_and_avoid_their_target(failure: FailureClass, retryable: bool, avoid: bool,
                                                     blames: bool) -> None:
    assert (failure.retryable, failure.avoid_target, failure.blames_target) == (retryable, avoid, blames)


def test_completion_budget_counts_whole_decimal_gigabytes_plus_a_margin() -> None:
    assert completion_budget_s(4 * GIB, 150) == 5 * 150 + 60  # 4 GiB = 4.29 GB -> 5
    assert completion_budget_s(0, 150) == 150 + 60


TIMEOUTS = {"pending_timeout_s": 300.0, "progress_timeout_s": 150.0, "completion_budget": 810.0}


@pytest.mark.parametrize(("phase", "created", "running", "change", "expect"), [
    ("Pending", 299, None, 299, None),
    ("Pending", 301, None, 301, FailureClass.UNSCHEDULABLE),          # never started: the target never came
    ("Pending", 200, None, 200, None),                                  # KubeVirt's queue is not "no progress"
    ("Scheduling", 200, None, 151, FailureClass.TIMEOUT),              # standing still before the transfer
    ("Scheduling", 200, None, 149, None),
    ("Running", 5000, 809, 809, None),
    ("Running", 5000, 811, 811, FailureClass.NOT_CONVERGING),          # transfer past the budget
    ("Running", 5000, 10, 10, None),                                   # long queue, then a fresh transfer
])
def test_migration_timeouts(phase: str, created: float, running: float | None, change: float,
                            expect: FailureClass | None) -> None:
    abort = migration_timeout(phase=phase, since_created=created, since_running=running, since_change=change,
                              **TIMEOUTS)
    assert (abort.failure if abort else None) is expect
    if abort is not None:
        assert abort.reason.startswith("aborted by drainctl: ")


@pytest.mark.parametrize(("phase", "failure", "cancelled", "attempt", "expect"), [
    (VmPhase.SUCCEEDED, None, False, 1, Settle.SUCCEEDED),
    (VmPhase.SUCCEEDED, None, True, 1, Settle.SUCCEEDED),             # the abort lost the race: the VM moved
    (VmPhase.CANCELLED, FailureClass.ABORTED, False, 1, Settle.CANCELLED),
    (VmPhase.FAILED, FailureClass.ABORTED, True, 1, Settle.CANCELLED),
    (VmPhase.FAILED, FailureClass.ABORTED, False, 1, Settle.RETRY),   # someone else aborted it
    (VmPhase.FAILED, FailureClass.NOT_CONVERGING, False, 2, Settle.RETRY),
    (VmPhase.FAILED, FailureClass.NOT_CONVERGING, False, 3, Settle.FAILED),  # out of attempts
    (VmPhase.FAILED, FailureClass.REJECTED, False, 1, Settle.FAILED),
    (VmPhase.FAILED, FailureClass.CONFLICT, False, 1, Settle.FAILED),
    (VmPhase.FAILED, None, False, 1, Settle.FAILED),
])
def test_what_becomes_of_a_vm_after_an_attempt(phase: VmPhase, failure: FailureClass | None, cancelled: bool,
                                               attempt: int, expect: Settle) -> None:
    assert settle_attempt(phase, failure, drain_cancelled=cancelled, attempt=attempt, max_attempts=3) is expect


def vm(name: str, phase: VmPhase, *, gib: int = 1, attempt: int = 1, enqueued: int | None = None) -> VmRecord:
    return VmRecord(vmi=f"ns/{name}", node="n1", phase=phase, memory_bytes=gib * GIB, attempt=attempt,
                    enqueued=enqueued)


def test_feed_window_starts_the_largest_queued_vms_up_to_the_window() -> None:
    vms = [vm("a", VmPhase.MIGRATING), vm("b", VmPhase.QUEUED, gib=2), vm("c", VmPhase.QUEUED, gib=8),
           vm("d", VmPhase.QUEUED, gib=4), vm("e", VmPhase.QUEUED, enqueued=1)]
    feed = feed_window(vms, window=3)
    assert [v.vmi for v in feed.live] == ["ns/a", "ns/e"]
    assert [v.vmi for v in feed.start] == ["ns/c"]
    assert feed_window(vms, window=1).start == ()


def test_a_retry_is_fed_again_once_its_new_attempt_is_not_enqueued() -> None:
    retry = vm("r", VmPhase.QUEUED, attempt=2, enqueued=1)
    assert [v.vmi for v in feed_window([retry], window=2).start] == ["ns/r"]


@pytest.mark.parametrize(("spare", "need", "ok"), [(10 * GIB, 10 * GIB, True), (10 * GIB, 11 * GIB, False)])
def test_capacity_verdict(spare: int, need: int, ok: bool) -> None:
    verdict, message = capacity_verdict(spare_bytes=spare, need_bytes=need, node="n2")
    assert verdict is ok
    assert (message == "") is ok
    if not ok:
        assert message == "waiting for capacity: spare memory 10 GiB < 11 GiB still to move from running nodes plus n2"


@pytest.mark.parametrize(("phases", "cancelling", "expect"), [
    ([], False, None),
    ([NodePhase.DRAINED, NodePhase.MIGRATING], False, None),
    ([NodePhase.DRAINED, NodePhase.DRAINED], False, "Succeeded"),
    ([NodePhase.DRAINED, NodePhase.INCOMPLETE], False, "Failed"),
    ([NodePhase.DRAINED, NodePhase.CANCELLED], True, "Cancelled"),
])
def test_drain_verdict(phases: list[NodePhase], cancelling: bool, expect: str | None) -> None:
    assert drain_verdict(phases, cancelling=cancelling) == expect


def test_a_wait_for_someone_elses_migration_has_a_deadline() -> None:
    assert not wait_expired(waited_s=100, limit_s=1110)
    assert wait_expired(waited_s=1111, limit_s=1110)


# ------------------------------------------------------------------------------------------- slots
@pytest.mark.parametrize(("work", "order", "first_to_last"), [
    # the node with the most work left goes first
    ({"a": 100.0, "b": 300.0, "c": 200.0}, ["a", "b", "c"], ["b", "c", "a"]),
    # equal work: the request's order
    ({"a": 50.0, "b": 50.0}, ["b", "a"], ["b", "a"]),
    # estimates within a second keep the request's order
    ({"a": 50.2, "b": 50.9}, ["a", "b"], ["a", "b"]),
    # a node outside the order (never happens in a drain) goes after those in it at equal work
    ({"x": 10.0, "a": 10.0}, ["a"], ["a", "x"]),
])
def test_node_priorities_most_work_left_first_then_request_order(
        work: dict[str, float], order: list[str], first_to_last: list[str]) -> None:
    prio = node_priorities(work, order)
    assert sorted(prio, key=prio.__getitem__) == first_to_last


@pytest.mark.parametrize(("memory", "setup", "bandwidth", "expected"), [
    (0, 10.0, 1e9, 10.0),
    (4_000_000_000, 10.0, 1e9, 14.0),
    (8_000_000_000, 5.0, 2e9, 9.0),
])
def test_migration_work_is_setup_plus_memory_over_bandwidth(memory: int, setup: float, bandwidth: float,
                                                            expected: float) -> None:
    assert migration_work_s(memory, setup_s=setup, bandwidth_bytes_per_s=bandwidth) == pytest.approx(expected)


@pytest.mark.parametrize(("failure", "attempt", "escalates", "expect"), [
    (FailureClass.NOT_CONVERGING, 3, True, Settle.RETRY),     # the ladder's attempts do not count
    (FailureClass.NOT_CONVERGING, 3, False, Settle.FAILED),
    (FailureClass.REJECTED, 1, True, Settle.FAILED),          # not retryable stays failed
])
def test_an_attempt_with_a_rung_left_is_retried_past_max_attempts(failure: FailureClass, attempt: int,
                                                                  escalates: bool, expect: Settle) -> None:
    assert settle_attempt(VmPhase.FAILED, failure, drain_cancelled=False, attempt=attempt, max_attempts=3,
                          escalates=escalates) is expect
