"""The tests' Redis: `DRAIN_TEST_REDIS_URL` chooses it, and without it a test skips locally but fails in CI."""

from __future__ import annotations

import pytest

from tests import redis_db
from tests.redis_db import claimed_db, free_port


def test_the_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAIN_TEST_REDIS_URL", "redis://:secret@redis.test:7000/3")
    assert redis_db.base_url() == "redis://:secret@redis.test:7000"
    assert redis_db.db_url(5) == "redis://:secret@redis.test:7000/5"
    monkeypatch.delenv("DRAIN_TEST_REDIS_URL")
    assert redis_db.db_url(0) == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
async def test_no_redis_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, ci: str,
                                                       outcome: type[BaseException]) -> None:
    monkeypatch.setenv("DRAIN_TEST_REDIS_URL", f"redis://127.0.0.1:{free_port()}")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="DRAIN_TEST_REDIS_URL"):
        async with claimed_db():
            raise AssertionError("no database can be claimed without Redis")
