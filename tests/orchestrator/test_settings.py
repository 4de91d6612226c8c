"""Settings: HCO-mirroring defaults, DRAIN_* parsing, overrides, and errors that name the culprit."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.settings import Limits, Settings, SettingsError, Timeouts, parse_duration


def test_defaults_mirror_hyperconverged_live_migration_config() -> None:
    settings = Settings()
    assert settings.limits == Limits(max_in_flight_cluster=5, max_in_flight_per_node=2, max_inbound_per_node=2)
    assert settings.timeouts.completion_timeout_per_gib == 150
    assert settings.timeouts.progress_timeout_s == 150
    assert settings.timeouts.pending_timeout_s == 300
    assert (settings.timeouts.retry_backoff_s, settings.timeouts.retry_backoff_max_s) == (20, 300)
    assert settings.timeouts.lease_ttl_s == 30
    assert settings.retry.max_attempts == 3
    assert settings.connection.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.connection.queue_name == "drainctl"
    assert settings.connection.kubeconfig is None
    assert settings.time_scale == 1.0
    assert Settings.from_env({}) == settings


@pytest.mark.parametrize(
    ("env", "path", "expected"),
    [
        ({"DRAIN_REDIS_URL": "redis://redis:6380/2"}, "connection.redis_url", "redis://redis:6380/2"),
        ({"DRAIN_TIME_SCALE": "60"}, "time_scale", 60.0),
        ({"DRAIN_MAX_IN_FLIGHT": "10"}, "limits.max_in_flight_cluster", 10),
        ({"DRAIN_MAX_PER_NODE": "1"}, "limits.max_in_flight_per_node", 1),
        ({"DRAIN_MAX_INBOUND_PER_NODE": "4"}, "limits.max_inbound_per_node", 4),
        ({"DRAIN_MAX_ATTEMPTS": "5"}, "retry.max_attempts", 5),
        ({"DRAIN_START_ON_EXPECTED_RUNG": "false"}, "retry.start_on_expected_rung", False),
        ({"DRAIN_START_ON_EXPECTED_RUNG": "1"}, "retry.start_on_expected_rung", True),
        ({"DRAIN_PROGRESS_TIMEOUT": "90"}, "timeouts.progress_timeout_s", 90.0),
        ({"DRAIN_PROGRESS_TIMEOUT": "2m"}, "timeouts.progress_timeout_s", 120.0),
        ({"DRAIN_PENDING_TIMEOUT": "500ms"}, "timeouts.pending_timeout_s", 0.5),
        ({"DRAIN_COMPLETION_TIMEOUT_PER_GIB": "20"}, "timeouts.completion_timeout_per_gib", 20),
        ({"DRAIN_LEASE_TTL": "1h"}, "timeouts.lease_ttl_s", 3600.0),
        ({"KUBECONFIG": "/tmp/kc"}, "connection.kubeconfig", "/tmp/kc"),
        ({"KUBECONFIG": "/a/kc:/b/kc"}, "connection.kubeconfig", "/a/kc"),
        ({"KUBECONFIG": "/tmp/kc", "DRAIN_KUBECONFIG": "/mine"}, "connection.kubeconfig", "/mine"),
        ({"DRAIN_CONTEXT": "sim"}, "connection.context", "sim"),
        ({"DRAIN_QUEUE_NAME": "drainctl-test"}, "connection.queue_name", "drainctl-test"),
        ({"DRAIN_ESTIMATE_NODE_BANDWIDTH": "2.8e9"}, "estimate.node_bandwidth_bytes_per_s", 2.8e9),
    ],
)
def test_from_env_reads_drain_variables(env: dict[str, str], path: str, expected: Any) -> None:
    value: Any = Settings.from_env(env)
    for part in path.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DRAIN_MAX_IN_FLIGHT": "many"}, "DRAIN_MAX_IN_FLIGHT: 'many' is not an integer"),
        ({"DRAIN_START_ON_EXPECTED_RUNG": "maybe"}, "DRAIN_START_ON_EXPECTED_RUNG: 'maybe' is not true or false"),
        ({"DRAIN_MAX_IN_FLIGHT": "0"}, "DRAIN_MAX_IN_FLIGHT: 0 is out of range"),
        ({"DRAIN_MAX_PER_NODE": "-1"}, "DRAIN_MAX_PER_NODE: -1 is out of range"),
        ({"DRAIN_MAX_ATTEMPTS": "2.5"}, "DRAIN_MAX_ATTEMPTS: '2.5' is not an integer"),
        ({"DRAIN_TIME_SCALE": "fast"}, "DRAIN_TIME_SCALE: 'fast' is not a number"),
        ({"DRAIN_TIME_SCALE": "0"}, "DRAIN_TIME_SCALE: 0.0 must be a number in (0, 100000]"),
        ({"DRAIN_TIME_SCALE": "inf"}, "DRAIN_TIME_SCALE: 'inf' is not a finite number"),
        ({"DRAIN_PROGRESS_TIMEOUT": "soon"}, "DRAIN_PROGRESS_TIMEOUT: 'soon' is not a duration"),
        ({"DRAIN_PROGRESS_TIMEOUT": "0"}, "DRAIN_PROGRESS_TIMEOUT: 0.0 must be a positive number"),
        ({"DRAIN_COMPLETION_TIMEOUT_PER_GIB": "0"}, "DRAIN_COMPLETION_TIMEOUT_PER_GIB: 0 must be at least 1"),
        ({"DRAIN_REDIS_URL": "http://localhost"}, "DRAIN_REDIS_URL: 'http://localhost' must start with redis://"),
        ({"DRAIN_REDIS_URL": ""}, "DRAIN_REDIS_URL: is set but empty"),
        ({"DRAIN_QUEUE_NAME": "a b"}, "DRAIN_QUEUE_NAME: 'a b' may only contain"),
        ({"DRAIN_RETRY_BACKOFF": "400"}, "(given: DRAIN_RETRY_BACKOFF)"),
        ({"DRAIN_RETRY_BACKOFF_MAX": "5"}, "DRAIN_RETRY_BACKOFF_MAX: 5.0 must be at least retry_backoff_s"),
    ],
)
def test_bad_env_values_fail_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert message in str(info.value)


def test_flat_overrides_beat_env_and_none_means_not_given() -> None:
    env = {"DRAIN_MAX_IN_FLIGHT": "9", "DRAIN_REDIS_URL": "redis://env:6379/0"}
    settings = Settings.from_env(env, max_in_flight_cluster=3, redis_url=None, time_scale=10.0, context=None)
    assert settings.limits.max_in_flight_cluster == 3
    assert settings.connection.redis_url == "redis://env:6379/0"
    assert settings.time_scale == 10.0
    assert settings.connection.context is None


def test_group_override_replaces_env_for_that_group_only() -> None:
    env = {"DRAIN_MAX_IN_FLIGHT": "9", "DRAIN_MAX_ATTEMPTS": "7"}
    settings = Settings.from_env(env, limits=Limits(max_in_flight_cluster=4))
    assert settings.limits.max_in_flight_cluster == 4
    assert settings.retry.max_attempts == 7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_in_flight": 3}, "max_in_flight: unknown setting"),
        ({"limits": Timeouts()}, "limits: expected Limits, got Timeouts"),
        ({"max_attempts": 0}, "max_attempts: 0 is out of range"),
        ({"time_scale": -2.0}, "time_scale: -2.0 must be a number"),
    ],
)
def test_bad_overrides_fail(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({}, **overrides)


@pytest.mark.parametrize(
    ("attempt", "delay"), [(1, 0.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 160.0), (6, 300.0), (20, 300.0)]
)
def test_backoff_doubles_and_caps(attempt: int, delay: float) -> None:
    assert Timeouts().backoff(attempt) == delay


@pytest.mark.parametrize(
    ("text", "seconds"), [("150", 150.0), ("150s", 150.0), ("2.5m", 150.0), ("1h", 3600.0), ("250ms", 0.25)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.time_scale = 2.0  # type: ignore[misc]


def test_to_wall_divides_by_time_scale() -> None:
    assert Settings(time_scale=60.0).to_wall(300.0) == 5.0
