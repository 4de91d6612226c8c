"""The orchestrator's Prometheus adapter, against the simulated cluster's Prometheus over HTTP."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

from orchestrator.prometheus import MigrationHistory, MigrationMetricsReader, VMIMigrationMetrics, parse_vector
from orchestrator.settings import Settings, SettingsError
from simulator import scenarios
from simulator.cluster import running_cluster
from simulator.resources import VMIMS

TOKEN = "prom-client-token"
HOT = ("analytics", "hot-00001")
DB = ("databases", "db-00001")


def test_settings_read_the_prometheus_url_and_token() -> None:
    settings = Settings.from_env({"DRAIN_PROMETHEUS_URL": "https://thanos:9091", "DRAIN_PROMETHEUS_TOKEN": "t"})
    assert settings.connection.prometheus_url == "https://thanos:9091"
    assert settings.connection.prometheus_token == "t"
    assert "'t'" not in repr(settings)  # the token is not printed
    assert Settings.from_env({}).connection.prometheus_url is None
    with pytest.raises(SettingsError, match=r"DRAIN_PROMETHEUS_URL: .*must be an http:// or https:// URL"):
        Settings.from_env({"DRAIN_PROMETHEUS_URL": "thanos:9091"})
    overridden = Settings.from_env({"DRAIN_PROMETHEUS_URL": "http://a:1"}, prometheus_url="http://b:2")
    assert overridden.connection.prometheus_url == "http://b:2"


async def test_without_a_url_it_reads_nothing() -> None:
    reader = MigrationMetricsReader.from_settings(Settings.from_env({}))
    assert not reader.enabled
    with capture_logs() as logs:
        assert await reader.read() == {}
    assert logs == []
    await reader.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_prometheus_is_reported_once_not_per_call() -> None:
    async with MigrationMetricsReader(f"http://127.0.0.1:{_free_port()}", timeout_s=2) as reader:
        with capture_logs() as logs:
            for _ in range(3):
                assert await reader.read() == {}
    assert [e["event"] for e in logs] == ["prometheus.unavailable"]


def test_a_history_judges_the_newest_migration_only() -> None:
    """A VMI's earlier attempt (half the bandwidth, other numbers) is in the same series: its processed bytes drop
    to zero when the next migration starts, and only the samples from there on are judged."""
    def series(*values: float) -> tuple[tuple[float, float], ...]:
        return tuple((float(t), v) for t, v in zip(range(0, 5 * len(values), 5), values, strict=True))

    history = MigrationHistory(
        namespace="a", name="b",
        data_processed_bytes=series(1e9, 4e9, 7e9, 0.2e9, 5e9),   # the second migration starts at t=15
        data_remaining_bytes=series(4e9, 4e9, 4e9, 8e9, 3e9),
        transfer_rate_bytes_per_s=series(0.7e9, 0.7e9, 0.7e9, 1.4e9, 1.4e9),
        dirty_rate_bytes_per_s=series(0.7e9, 0.7e9, 0.7e9, 0.7e9, 0.7e9))
    assert [s.t for s in history.samples()] == [15.0, 20.0]
    assert all(s.transfer_rate == 1.4e9 for s in history.samples())
    one = MigrationHistory(namespace="a", name="b", data_processed_bytes=series(1e9, 2e9),
                           data_remaining_bytes=series(4e9, 3e9), transfer_rate_bytes_per_s=series(1e9, 1e9),
                           dirty_rate_bytes_per_s=series(0.5e9, 0.5e9))
    assert [s.t for s in one.samples()] == [0.0, 5.0]  # one migration: every sample


def test_parse_vector_ignores_what_it_does_not_know() -> None:
    body = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "kubevirt_vmi_migration_data_remaining_bytes", "namespace": "a", "name": "b",
                    "node": "n"}, "value": [10.5, "42"]},
        {"metric": {"__name__": "kubevirt_vmi_migration_dirty_memory_rate_bytes", "namespace": "a", "name": "b"},
         "value": [10.5, "7.5"]},
        {"metric": {"__name__": "something_else", "namespace": "a", "name": "b"}, "value": [10.5, "1"]},
        {"metric": {"__name__": "kubevirt_vmi_migration_data_remaining_bytes"}, "value": [10.5, "1"]},
        {"metric": {"__name__": "kubevirt_vmi_migration_data_processed_bytes", "namespace": "a", "name": "b"},
         "value": [10.5, "NaN"]},
    ]}}
    assert parse_vector(body) == {("a", "b"): VMIMigrationMetrics(
        namespace="a", name="b", node="n", at=10.5, data_remaining_bytes=42.0, dirty_rate_bytes_per_s=7.5)}


async def test_reads_live_migration_metrics_from_the_simulated_cluster() -> None:
    """While migrations run on `hostile`, the numbers move; the converging VM's remaining bytes shrink, the
    non-converging one's do not, and its dirty rate stays at or above its transfer rate."""
    async with running_cluster(scenarios.builtin("hostile"), time_scale=25.0, token=TOKEN, tls=False,
                               prometheus_port=0) as rc:
        assert rc.prometheus_url is not None
        settings = Settings.from_env({"DRAIN_PROMETHEUS_URL": rc.prometheus_url, "DRAIN_PROMETHEUS_TOKEN": TOKEN})
        wws = {vm["vmi"]: vm["wws_bytes"] for vm in rc.cluster.scenario_json()["vms"]}
        for ns, name in (HOT, DB):
            rc.cluster.store.create(VMIMS, {"metadata": {"namespace": ns, "name": f"mig-{name}"},
                                            "spec": {"vmiName": name}})
        samples: list[dict[tuple[str, str], VMIMigrationMetrics]] = []
        async with MigrationMetricsReader.from_settings(settings) as reader:
            loop = asyncio.get_running_loop()
            end = loop.time() + 90
            while loop.time() < end:
                got = await reader.read()
                if HOT in got:
                    samples.append(got)
                if DB not in got and any(DB in s for s in samples):
                    break  # the converging VM finished: KubeVirt no longer reports it
                await asyncio.sleep(0.1)
            assert await reader.read(namespace="web") == {}
            # the same story from one range query each, as a stateless job would ask for it
            end = samples[-1][HOT].at
            hot_history = await reader.history(*HOT, end=end, window_s=120)
            db_history = await reader.history(*DB, end=end, window_s=120)
            assert await reader.history("web", "web-00001", end=end) is None
        assert hot_history is not None and db_history is not None
        assert len(hot_history.data_remaining_bytes) >= 10
        assert min(v for _, v in hot_history.data_remaining_bytes) >= 0.99 * wws["/".join(HOT)]
        db_remaining = [v for _, v in db_history.data_remaining_bytes]
        assert len(db_remaining) >= 3 and db_remaining[-1] < db_remaining[0] / 2
        assert db_history.data_processed_bytes[-1][1] > db_history.data_processed_bytes[0][1]
        hot = [s[HOT] for s in samples]
        db = [s[DB] for s in samples if DB in s]
        assert len(db) >= 3, "too few samples while the converging VM migrated"
        assert db[-1].data_remaining_bytes is not None and db[0].data_remaining_bytes is not None
        assert db[-1].data_remaining_bytes < db[0].data_remaining_bytes / 2
        assert all(h.node == "worker-01" for h in hot)
        processed = [h.data_processed_bytes for h in hot]
        assert processed[-1] is not None and processed[0] is not None and processed[-1] > processed[0]
        assert min(h.data_remaining_bytes or 0 for h in hot) >= 0.99 * wws["/".join(HOT)]
        # While both migrate their shares of the NIC are steady. The measured dirty rate is the last completed
        # round's (QEMU's bitmap sync), so the long first pass reads low; later rounds read at the transfer rate.
        last = [s[HOT] for s in samples if DB in s][-1]
        assert last.dirty_rate_bytes_per_s is not None and last.transfer_rate_bytes_per_s is not None
        assert last.dirty_rate_bytes_per_s >= 0.99 * last.transfer_rate_bytes_per_s > 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while True:  # the series ends with the transfer; the VMIM succeeds after KubeVirt's cleanup
            phases = {m["vmi"]: m["phase"] for m in (await rc.stats())["migrations"]}
            if phases["/".join(DB)] == "Succeeded" or loop.time() > end:
                break
            await asyncio.sleep(0.05)
        assert phases["/".join(DB)] == "Succeeded" and phases["/".join(HOT)] == "Running"


async def test_a_wrong_token_reads_nothing_and_says_so_once() -> None:
    async with running_cluster(scenarios.builtin("small"), time_scale=10.0, token=TOKEN, tls=False,
                               prometheus_port=0) as rc:
        async with MigrationMetricsReader(rc.prometheus_url, token="wrong") as reader:
            with capture_logs() as logs:
                assert await reader.read() == {}
                assert await reader.read() == {}
        assert [e["event"] for e in logs] == ["prometheus.unavailable"]
        assert "HTTP 401" in logs[0]["reason"]
        async with MigrationMetricsReader(rc.prometheus_url, token=TOKEN) as reader:
            assert await reader.read() == {}  # nothing migrates: no series, no error


async def test_guest_dirty_rates_of_vms_that_are_not_migrating() -> None:
    async with running_cluster(scenarios.builtin("hostile"), time_scale=100.0, token=TOKEN, tls=False,
                               prometheus_port=0) as rc:
        physics = {vm["vmi"]: vm for vm in rc.cluster.scenario_json()["vms"]}
        async with MigrationMetricsReader(rc.prometheus_url, token=TOKEN) as reader:
            rates = await reader.guest_dirty_rates(namespace="analytics")
            assert rates and all(ns == "analytics" for ns, _ in rates)
            hot = physics["/".join(HOT)]
            assert rates[HOT] <= hot["dirty_bytes_per_s"] < rates[HOT] + 2**20  # whole MiB/s, as libvirt counts
            assert len(await reader.guest_dirty_rates()) == sum(1 for vm in physics.values() if vm["node"])
            rc.cluster.store.create(VMIMS, {"metadata": {"namespace": HOT[0], "name": "mig"},
                                            "spec": {"vmiName": HOT[1]}})
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while HOT in await reader.guest_dirty_rates(namespace="analytics"):  # migrating: not exported
                assert loop.time() < end
                await asyncio.sleep(0.05)
            while HOT not in await reader.read(namespace="analytics"):  # the migration's own metrics take over
                assert loop.time() < end
                await asyncio.sleep(0.05)
