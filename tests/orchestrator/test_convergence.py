"""The convergence verdict: table cases, and the verdict from KubeVirt's metrics of the simulated cluster over
HTTP (a VM that cannot converge is judged so within a bounded time; one that converges never is)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.convergence import Convergence, Sample, judge
from orchestrator.prometheus import MigrationMetricsReader
from simulator import scenarios
from simulator.cluster import running_cluster
from simulator.resources import VMIMS

GB = 1e9
B = 0.5625 * GB  # a VM's share of a 10 GbE migration NIC shared by two migrations


def series(*, start: float = 0.0, seconds: float, first_pass_s: float = 15.0, first_rate: float = 0.23 * GB,
           dirty: float = B, transfer: float = B, remaining: float = 3 * GB,
           shrink_per_s: float = 0.0) -> list[Sample]:
    """Samples every 5 s: the first pass (no dirty rate), its low first measurement, then steady rounds."""
    out = []
    t = start
    while t <= start + seconds:
        if t < start + first_pass_s:
            rate = 0.0
        elif t < start + first_pass_s + 5:
            rate = first_rate
        else:
            rate = dirty
        left = remaining - shrink_per_s * max(0.0, t - start - first_pass_s)
        out.append(Sample(t=t, remaining_bytes=max(left, 0.0), transfer_rate=transfer, dirty_rate=rate))
        t += 5.0
    return out


@pytest.mark.parametrize(("samples", "kwargs", "expected", "reason"), [
    ([], {}, Convergence.UNKNOWN, "no dirty rate measured yet"),
    (series(seconds=10), {}, Convergence.UNKNOWN, "first pre-copy pass"),
    (series(seconds=80, dirty=0.26 * GB), {}, Convergence.CONVERGING, "less than the"),
    (series(seconds=80), {}, Convergence.CANNOT_CONVERGE, "cannot converge: dirties 536.4 MiB/s, the network "
                                                            "carries 536.4 MiB/s; 2.8 GiB stay dirty after 60 s"),
    (series(seconds=80, dirty=1.2 * B), {}, Convergence.CANNOT_CONVERGE, "cannot converge"),
    (series(seconds=40), {}, Convergence.UNKNOWN, "gathering evidence"),
    (series(seconds=80, shrink_per_s=0.02 * GB), {}, Convergence.UNKNOWN, "still reach new lows"),
    (series(seconds=80), {"auto_converge": True}, Convergence.UNKNOWN, "gathering evidence"),
    (series(seconds=300), {"auto_converge": True}, Convergence.CANNOT_CONVERGE, "cannot converge"),
    (series(seconds=80, remaining=0.1 * GB), {}, Convergence.CONVERGING, "fit the downtime budget"),
    # the whole memory is hot: every measurement reads the transfer rate, evidence starts a round later
    (series(seconds=80, first_rate=B), {}, Convergence.CANNOT_CONVERGE, "cannot converge"),
    (series(seconds=80, dirty=0.99 * B), {"tolerance": 0.02}, Convergence.CANNOT_CONVERGE, "cannot converge"),
])
def test_judge(samples: list[Sample], kwargs: dict[str, object], expected: Convergence, reason: str) -> None:
    verdict = judge(samples, **kwargs)  # type: ignore[arg-type]
    assert verdict.convergence is expected, verdict
    assert reason in verdict.reason
    if expected is Convergence.CANNOT_CONVERGE:
        assert verdict.dirty_rate is not None and verdict.transfer_rate is not None
        assert verdict.evidence_s >= 30


def test_judge_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="min_evidence_s"):
        judge([], min_evidence_s=0)


async def test_verdict_from_the_simulated_clusters_metrics() -> None:
    """On `hostile`, hot-00001 dirties memory faster than its share of the NIC: judged CANNOT_CONVERGE from
    Prometheus within a bounded cluster time after its transfer started; db-00001 converges and never is."""
    hot, db = ("analytics", "hot-00001"), ("databases", "db-00001")
    async with running_cluster(scenarios.builtin("hostile"), time_scale=25.0, token="t", tls=False,
                               prometheus_port=0) as rc:
        for ns, name in (hot, db):
            rc.cluster.store.create(VMIMS, {"metadata": {"namespace": ns, "name": f"mig-{name}"},
                                            "spec": {"vmiName": name}})
        verdicts: dict[tuple[str, str], list[tuple[float, Convergence, str]]] = {hot: [], db: []}
        async with MigrationMetricsReader(rc.prometheus_url, token="t") as reader:
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while not (any(v[1] is Convergence.CANNOT_CONVERGE for v in verdicts[hot])
                       and any(v[1] is Convergence.CONVERGING for v in verdicts[db])):
                assert loop.time() < end, f"no verdicts in time: {verdicts[hot][-2:]} {verdicts[db][-2:]}"
                for key, now in (await reader.read()).items():
                    history = await reader.history(*key, end=now.at, window_s=60)
                    if history is not None:
                        verdict = judge(history.samples())
                        verdicts[key].append((now.at - rc.cluster.clock.epoch, verdict.convergence, verdict.reason))
                await asyncio.sleep(0.05)
        started = {m["vmi"]: m["started_s"] for m in rc.cluster.stats()["migrations"]}
    judged_at, _, reason = next(v for v in verdicts[hot] if v[1] is Convergence.CANNOT_CONVERGE)
    assert judged_at - started["analytics/hot-00001"] <= 90  # cluster seconds of pre-copy before the verdict
    assert reason.startswith("cannot converge: dirties ")
    assert verdicts[db] and all(v[1] is not Convergence.CANNOT_CONVERGE for v in verdicts[db])
    assert any(v[1] is Convergence.CONVERGING for v in verdicts[db])
