"""The Redis semaphore, run against fakeredis (with lupa) and against the real test Redis (tests.redis_db)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator import keys
from tests import redis_db
from workers.semaphore import HeldSlot, Lease, RedisSemaphore, Scope, SemaphoreLost, hold

REAL_REDIS_URL = redis_db.db_url(0)
# Generous bound for anything that should happen "soon"; tests assert on order, not on speed.
PATIENCE_S = 30.0

CLUSTER = Scope(keys.CLUSTER_SCOPE, 1)


@dataclass
class Backend:
    """Makes clients that all see the same Redis data, and cleans up after the test."""

    new_client: Callable[[], Redis]
    clients: list[Redis] = field(default_factory=list)

    def client(self) -> Redis:
        client = self.new_client()
        self.clients.append(client)
        return client


@pytest.fixture(params=["fakeredis", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        result = Backend(lambda: fakeredis.aioredis.FakeRedis(server=server))
    else:
        probe = Redis.from_url(REAL_REDIS_URL)
        try:
            await probe.ping()
        except RedisConnectionError:
            redis_db.no_redis(f"no Redis at {REAL_REDIS_URL}")
        finally:
            await probe.aclose()
        result = Backend(lambda: Redis.from_url(REAL_REDIS_URL))
    yield result
    for client in result.clients:
        await client.aclose()


SemaphoreFactory = Callable[..., RedisSemaphore]


@pytest.fixture
async def make_semaphore(backend: Backend) -> AsyncIterator[SemaphoreFactory]:
    """Semaphores sharing one unique name; each may get its own client, like separate workers."""
    name = f"test-{uuid.uuid4().hex}"
    first = backend.client()

    def make(*, own_client: bool = False, **kwargs: Any) -> RedisSemaphore:
        kwargs.setdefault("poll_interval_s", 0.2)
        return RedisSemaphore(backend.client() if own_client else first, name=name, **kwargs)

    yield make
    tag = keys.semaphore_keys(name).tag
    leftovers = [key async for key in first.scan_iter(match=f"{tag}*")]
    if leftovers:
        await first.delete(*leftovers)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check`` holds; fail after PATIENCE_S."""
    async with asyncio.timeout(PATIENCE_S):
        while not await check():  # noqa: ASYNC110  # the state lives in Redis; no event to await
            await asyncio.sleep(0.02)
    assert await check(), what


def hang_after_grant(sem: RedisSemaphore, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make ``sem`` stall right after its script granted a lease, before the caller sees it."""
    real = sem._attempt
    granted = asyncio.Event()

    async def attempt_then_hang(*args: Any, **kwargs: Any) -> Lease | None:
        lease = await real(*args, **kwargs)
        if lease is not None:
            granted.set()
            await asyncio.Event().wait()
        return lease

    monkeypatch.setattr(sem, "_attempt", attempt_then_hang)
    return granted


# Granting and releasing ----------------------------------------------------------------------------


async def test_try_acquire_grants_up_to_the_limit_with_increasing_tokens(
    make_semaphore: SemaphoreFactory,
) -> None:
    sem = make_semaphore()
    scopes = [Scope("cluster", 2)]

    first = await sem.try_acquire("a", scopes, meta={"vmi": "ns/a"})
    second = await sem.try_acquire("b", scopes)
    third = await sem.try_acquire("c", scopes)

    assert first is not None and second is not None
    assert third is None
    assert second.token > first.token
    assert await sem.usage() == {"cluster": 2, "waiters": 0}
    infos = {info.holder: info for info in await sem.holders()}
    assert set(infos) == {"a", "b"}
    assert dict(infos["a"].meta) == {"vmi": "ns/a"}
    assert not infos["a"].expired


async def test_reacquire_by_the_same_holder_renews_and_keeps_its_token(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    scopes = [Scope("cluster", 1), Scope("node:n1", 1)]
    first = await sem.try_acquire("a", scopes)

    again = await sem.try_acquire("a", list(reversed(scopes)))

    assert first is not None and again is not None
    assert again.token == first.token
    assert again.expires_at_ms >= first.expires_at_ms
    assert again.scopes == ("cluster", "node:n1")
    assert await sem.usage() == {"cluster": 1, "node:n1": 1, "waiters": 0}


async def test_reacquire_with_other_scopes_is_refused(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    assert await sem.try_acquire("a", [Scope("cluster", 5), Scope("node:n1", 2)]) is not None

    with pytest.raises(ValueError, match="already holds"):
        await sem.try_acquire("a", [Scope("cluster", 5), Scope("node:n2", 2)])
    assert await sem.usage() == {"cluster": 1, "node:n1": 1, "waiters": 0}


async def test_all_scopes_or_none_are_taken(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    assert await sem.try_acquire("a", [Scope("cluster", 5), Scope("node:n1", 1)]) is not None

    assert await sem.try_acquire("b", [Scope("cluster", 5), Scope("node:n1", 1)]) is None

    assert await sem.usage() == {"cluster": 1, "node:n1": 1, "waiters": 0}


async def test_release_is_owner_checked_when_a_token_is_given(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    lease = await sem.try_acquire("a", [CLUSTER])
    assert lease is not None

    assert await sem.release("a", token=lease.token + 1) is False
    assert await sem.release("nobody") is False
    assert await sem.usage() == {"cluster": 1, "waiters": 0}
    assert await sem.release("a", token=lease.token) is True
    assert await sem.release("a", token=lease.token) is False
    assert await sem.usage() == {"waiters": 0}
    assert await sem.holders() == []


@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        ([], "at least one scope"),
        ([Scope("cluster", 5), Scope("cluster", 3)], "given twice"),
    ],
)
async def test_bad_scopes_are_refused(
    make_semaphore: SemaphoreFactory, scopes: list[Scope], message: str
) -> None:
    sem = make_semaphore()
    with pytest.raises(ValueError, match=message):
        await sem.try_acquire("a", scopes)
    assert await sem.usage() == {"waiters": 0}


@pytest.mark.parametrize(
    ("name", "limit", "message"),
    [("", 1, "empty"), ("cluster", 0, "limit"), ("waiters", 1, "reserved"), ("a\nb", 1, "newline")],
)
def test_scope_validates_name_and_limit(name: str, limit: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scope(name, limit)


# Concurrency -----------------------------------------------------------------------------------------


async def _sample_usage(sem: RedisSemaphore, peaks: Counter[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for scope, count in (await sem.usage()).items():
            peaks[scope] = max(peaks[scope], count)
        await asyncio.sleep(0)


async def test_fifty_contenders_never_exceed_the_limit_and_all_finish(
    make_semaphore: SemaphoreFactory,
) -> None:
    limit = 5
    workers = [make_semaphore(own_client=True) for _ in range(5)]
    observer = make_semaphore(own_client=True)
    scopes = [Scope("cluster", limit)]
    holding = 0
    peak_holding = 0
    saturated = asyncio.Event()
    tokens: list[int] = []

    async def contender(index: int) -> None:
        nonlocal holding, peak_holding
        sem = workers[index % len(workers)]
        lease = await sem.acquire(f"h{index}", scopes, timeout_s=PATIENCE_S)
        tokens.append(lease.token)
        holding += 1
        peak_holding = max(peak_holding, holding)
        if holding == limit:
            saturated.set()
        # The first holders stay until the limit is reached, so the test proves the cap is hit
        # and held rather than never approached.
        await saturated.wait()
        holding -= 1
        assert await sem.release(lease.holder, token=lease.token)

    peaks: Counter[str] = Counter()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        sampler = group.create_task(_sample_usage(observer, peaks, stop), name="sampler")
        async with asyncio.TaskGroup() as contenders:
            for index in range(50):
                contenders.create_task(contender(index), name=f"contender-{index}")
        stop.set()
        await sampler

    assert peak_holding == limit
    assert 0 < peaks["cluster"] <= limit
    assert sorted(tokens) == sorted(set(tokens)) and len(tokens) == 50
    assert await observer.usage() == {"waiters": 0}


async def test_node_scope_caps_each_node_below_the_cluster_limit(make_semaphore: SemaphoreFactory) -> None:
    workers = [make_semaphore(own_client=True) for _ in range(3)]
    observer = make_semaphore(own_client=True)
    nodes = ["n1", "n2", "n3"]
    holding: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    saturated = asyncio.Event()

    async def contender(node: str, index: int) -> None:
        sem = workers[index % len(workers)]
        scopes = [Scope("cluster", 5), Scope(keys.node_scope(node), 2)]
        lease = await sem.acquire(f"{node}/{index}", scopes, timeout_s=PATIENCE_S)
        holding[node] += 1
        peak[node] = max(peak[node], holding[node])
        peak["cluster"] = max(peak["cluster"], holding.total())
        # 3 nodes x 2 > 5, so the first wave always fills the cluster scope.
        if holding.total() == 5:
            saturated.set()
        await saturated.wait()
        holding[node] -= 1
        assert await sem.release(lease.holder, token=lease.token)

    sampled: Counter[str] = Counter()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        sampler = group.create_task(_sample_usage(observer, sampled, stop), name="sampler")
        async with asyncio.TaskGroup() as contenders:
            for node in nodes:
                for index in range(8):
                    contenders.create_task(contender(node, index), name=f"contender-{node}-{index}")
        stop.set()
        await sampler

    assert peak["cluster"] == 5
    assert all(peak[node] <= 2 for node in nodes)
    # Five holders over three nodes of at most two each: at least two nodes were full at once.
    assert sum(peak[node] == 2 for node in nodes) >= 2
    assert sampled["cluster"] <= 5
    assert all(sampled[keys.node_scope(node)] <= 2 for node in nodes)
    assert await observer.usage() == {"waiters": 0}


# Expiry, adoption and fencing ----------------------------------------------------------------------


async def _expired_holders(sem: RedisSemaphore) -> set[str]:
    return {info.holder for info in await sem.expired()}


async def test_expired_lease_keeps_its_slot_and_is_reported(make_semaphore: SemaphoreFactory) -> None:
    short = make_semaphore(lease_ttl_s=0.2)
    lease = await short.try_acquire("a", [CLUSTER], meta={"vmim": "m1"})
    assert lease is not None

    async def a_expired() -> bool:
        return await _expired_holders(short) == {"a"}

    await eventually(a_expired, "lease a shows as expired")
    assert await short.try_acquire("b", [CLUSTER]) is None
    assert await short.usage() == {"cluster": 1, "waiters": 0}
    [info] = await short.expired()
    assert (info.token, info.scopes, dict(info.meta)) == (lease.token, ("cluster",), {"vmim": "m1"})


async def test_expired_lease_cannot_be_renewed_by_its_old_owner(make_semaphore: SemaphoreFactory) -> None:
    short = make_semaphore(lease_ttl_s=0.2)
    lease = await short.try_acquire("a", [CLUSTER])
    assert lease is not None

    async def a_expired() -> bool:
        return await _expired_holders(short) == {"a"}

    await eventually(a_expired, "lease a shows as expired")
    with pytest.raises(SemaphoreLost, match="expired"):
        await short.renew(lease)
    assert await short.usage() == {"cluster": 1, "waiters": 0}


async def test_adopt_fences_out_the_old_token_and_release_frees_the_slot(
    make_semaphore: SemaphoreFactory,
) -> None:
    short = make_semaphore(lease_ttl_s=0.2)
    reconciler = make_semaphore(own_client=True, lease_ttl_s=30)
    old = await short.try_acquire("a", [CLUSTER])
    assert old is not None

    async def a_expired() -> bool:
        return await _expired_holders(reconciler) == {"a"}

    await eventually(a_expired, "lease a shows as expired")

    adopted = await reconciler.adopt("a", expected_token=old.token)

    assert adopted.token > old.token
    assert adopted.scopes == old.scopes
    assert await reconciler.expired() == []
    with pytest.raises(SemaphoreLost, match=f"token {adopted.token}"):
        await reconciler.renew(old)
    assert (await reconciler.renew(adopted)).token == adopted.token
    assert await reconciler.release("a", token=old.token) is False
    assert await reconciler.release("a", token=adopted.token) is True
    assert await reconciler.try_acquire("b", [CLUSTER]) is not None


async def test_adopt_refuses_a_lease_that_changed_or_vanished(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    lease = await sem.try_acquire("a", [CLUSTER])
    assert lease is not None

    with pytest.raises(SemaphoreLost, match="has token"):
        await sem.adopt("a", expected_token=lease.token + 1)
    with pytest.raises(SemaphoreLost, match="no lease"):
        await sem.adopt("nobody")


async def test_reacquire_of_an_expired_lease_gets_a_new_token(make_semaphore: SemaphoreFactory) -> None:
    short = make_semaphore(lease_ttl_s=0.2)
    rerun = make_semaphore(lease_ttl_s=30)
    old = await short.try_acquire("a", [CLUSTER])
    assert old is not None

    async def a_expired() -> bool:
        return await _expired_holders(short) == {"a"}

    await eventually(a_expired, "lease a shows as expired")

    again = await rerun.try_acquire("a", [CLUSTER])

    assert again is not None and again.token > old.token
    assert await short.release("a", token=old.token) is False


# Waiting -------------------------------------------------------------------------------------------


async def _waiters_are(sem: RedisSemaphore, count: int) -> bool:
    return await sem.waiters() == count


async def test_waiter_wakes_on_release_not_on_the_poll(make_semaphore: SemaphoreFactory) -> None:
    # With an hour between polls, only the release message can wake the waiter in time.
    sem = make_semaphore(own_client=True, poll_interval_s=3600)
    other = make_semaphore(own_client=True)
    first = await other.try_acquire("a", [CLUSTER])
    assert first is not None
    waiter = asyncio.create_task(sem.acquire("b", [CLUSTER]), name="waiter")

    await eventually(lambda: _waiters_are(other, 1), "b is waiting")
    assert not waiter.done()
    assert await other.release("a", token=first.token)
    second = await asyncio.wait_for(waiter, PATIENCE_S)

    assert second.token > first.token
    assert await other.usage() == {"cluster": 1, "waiters": 0}


@pytest.mark.parametrize("with_choice", [False, True])
async def test_a_freed_slot_goes_to_the_waiter_with_the_smallest_priority_number_that_can_use_it(
    make_semaphore: SemaphoreFactory, with_choice: bool,
) -> None:
    # Two cluster slots; node a is full. Waiters: a (priority 0, but its node has no room), b (priority 2),
    # c (priority 1). When the cluster slot frees, c takes it: a has no room, b comes after c.
    sem = make_semaphore(own_client=True)
    two = Scope(keys.CLUSTER_SCOPE, 2)
    node_a = Scope(keys.node_scope("a"), 1)
    first = await sem.try_acquire("a-0", [two, node_a])
    other = await sem.try_acquire("x-0", [two])
    assert first is not None and other is not None
    async def inbound() -> list[Scope]:
        return [Scope(keys.inbound_scope("t1"), 10), Scope(keys.inbound_scope("t2"), 10)]

    waiters = {
        name: asyncio.create_task(make_semaphore(own_client=True).acquire(
            name, scopes, priority=priority, choose=inbound if with_choice else None), name=name)
        for name, scopes, priority in (("a-1", [two, node_a], 0.0), ("b-1", [two, keys_node("b")], 2.0),
                                       ("c-1", [two, keys_node("c")], 1.0))
    }
    await eventually(lambda: _waiters_are(sem, 3), "three waiters")

    assert await sem.release("x-0", token=other.token)
    await eventually(lambda: _held(sem, "c-1"), "c-1 took the freed slot")
    assert not waiters["b-1"].done()
    assert not waiters["a-1"].done()
    # A caller without a priority does not jump the queue of prioritised waiters either way when full.
    assert await sem.try_acquire("d-0", [two]) is None

    # Node a frees (and with it a cluster slot): a-1 (priority 0) has room now and goes before b-1.
    assert await sem.release("a-0", token=first.token)
    await eventually(lambda: _held(sem, "a-1"), "a-1 took node a's slot")
    assert not waiters["b-1"].done()
    for task in waiters.values():
        task.cancel()
    await asyncio.gather(*waiters.values(), return_exceptions=True)
    assert await sem.waiters() == 0
    assert await make_semaphore()._redis.hlen(keys.semaphore_keys(sem.name).waiter_priorities) == 0


def keys_node(name: str) -> Scope:
    return Scope(keys.node_scope(name), 1)


async def _held(sem: RedisSemaphore, holder: str) -> bool:
    return holder in {info.holder for info in await sem.holders()}


async def test_a_prioritised_newcomer_waits_behind_a_more_urgent_waiter(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore(own_client=True)
    one = Scope(keys.CLUSTER_SCOPE, 1)
    first = await sem.try_acquire("h", [one])
    assert first is not None
    urgent = asyncio.create_task(make_semaphore(own_client=True).acquire("u", [one], priority=-5.0))
    await eventually(lambda: _waiters_are(sem, 1), "u waits")
    # The slot is free for an instant between the release and u's attempt: a newcomer with a larger
    # number must not take it.
    await sem.release("h", token=first.token)
    late = await sem.try_acquire("late", [one], priority=3.0)
    lease = await asyncio.wait_for(urgent, PATIENCE_S)
    assert late is None or lease is None  # never both
    assert {info.holder for info in await sem.holders()} == {"u"}


async def test_on_wait_is_awaited_once_before_waiting(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    first = await sem.try_acquire("a", [CLUSTER])
    assert first is not None
    calls = 0
    told = asyncio.Event()

    async def on_wait() -> None:
        nonlocal calls
        calls += 1
        told.set()

    waiter = asyncio.create_task(sem.acquire("b", [CLUSTER], on_wait=on_wait), name="waiter")
    await asyncio.wait_for(told.wait(), PATIENCE_S)
    await eventually(lambda: _waiters_are(sem, 1), "b is waiting")
    await sem.release("a")
    await asyncio.wait_for(waiter, PATIENCE_S)

    assert calls == 1


async def test_acquire_times_out_and_leaves_no_waiter(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    assert await sem.try_acquire("a", [CLUSTER]) is not None

    with pytest.raises(TimeoutError, match="no room"):
        await sem.acquire("b", [CLUSTER], timeout_s=0.3)

    assert await sem.waiters() == 0
    assert [info.holder for info in await sem.holders()] == ["a"]


async def test_a_dead_waiter_drops_out_after_missing_heartbeats(
    make_semaphore: SemaphoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sem = make_semaphore(poll_interval_s=0.05)
    assert await sem.try_acquire("a", [CLUSTER]) is not None

    async def no_cleanup(*args: Any, **kwargs: Any) -> None:
        return None  # a killed process runs no clean-up

    monkeypatch.setattr(sem, "_abandon", no_cleanup)
    waiter = asyncio.create_task(sem.acquire("b", [CLUSTER]), name="waiter")
    await eventually(lambda: _waiters_are(sem, 1), "b is waiting")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await sem.waiters() == 1

    await eventually(lambda: _waiters_are(sem, 0), "the dead waiter drops out")


# Cancellation --------------------------------------------------------------------------------------


async def test_cancel_while_waiting_leaves_nothing_behind(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    first = await sem.try_acquire("a", [CLUSTER])
    assert first is not None
    waiter = asyncio.create_task(sem.acquire("b", [CLUSTER]), name="waiter")
    await eventually(lambda: _waiters_are(sem, 1), "b is waiting")

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert await sem.waiters() == 0
    assert await sem.release("a", token=first.token)
    assert await sem.usage() == {"waiters": 0}
    assert await sem.holders() == []


@pytest.mark.parametrize("contended", [False, True], ids=["first-attempt", "after-waiting"])
async def test_cancel_right_after_the_grant_gives_the_slot_back(
    make_semaphore: SemaphoreFactory, monkeypatch: pytest.MonkeyPatch, contended: bool
) -> None:
    sem = make_semaphore()
    other = make_semaphore(own_client=True)
    granted = hang_after_grant(sem, monkeypatch)
    first = await other.try_acquire("a", [CLUSTER]) if contended else None
    acquiring = asyncio.create_task(sem.acquire("b", [CLUSTER]), name="acquiring")
    if first is not None:
        await eventually(lambda: _waiters_are(other, 1), "b is waiting")
        await other.release("a", token=first.token)

    await asyncio.wait_for(granted.wait(), PATIENCE_S)
    assert [info.holder for info in await other.holders()] == ["b"]
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring

    assert await other.usage() == {"waiters": 0}
    assert await other.holders() == []


async def test_cancelled_try_acquire_after_the_grant_gives_the_slot_back(
    make_semaphore: SemaphoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sem = make_semaphore()
    granted = hang_after_grant(sem, monkeypatch)
    acquiring = asyncio.create_task(sem.try_acquire("b", [CLUSTER]), name="acquiring")
    await asyncio.wait_for(granted.wait(), PATIENCE_S)

    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring

    assert await sem.holders() == []


async def test_cancelled_reacquire_keeps_the_lease_held_before(
    make_semaphore: SemaphoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sem = make_semaphore()
    before = await sem.try_acquire("a", [CLUSTER])
    assert before is not None
    granted = hang_after_grant(sem, monkeypatch)
    acquiring = asyncio.create_task(sem.acquire("a", [CLUSTER]), name="reacquiring")
    await asyncio.wait_for(granted.wait(), PATIENCE_S)

    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring

    assert [(info.holder, info.token) for info in await sem.holders()] == [("a", before.token)]


async def test_release_completes_even_when_its_caller_is_cancelled(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    lease = await sem.try_acquire("a", [CLUSTER])
    assert lease is not None

    releasing = asyncio.create_task(sem.release("a", token=lease.token), name="releasing")
    await asyncio.sleep(0)  # let the release start, then cancel it mid-flight
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing

    async def released() -> bool:
        return await sem.holders() == []

    await eventually(released, "the shielded release finished")


# hold() --------------------------------------------------------------------------------------------


async def test_hold_renews_in_the_background_and_releases_on_exit(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore(lease_ttl_s=1.0)
    async with hold(sem, "a", [CLUSTER], meta={"vmim": "m"}, renew_every_s=0.1) as slot:
        first = slot.lease

        async def renewed_past_first_expiry() -> bool:
            return slot.lease.expires_at_ms > first.expires_at_ms + 1000

        await eventually(renewed_past_first_expiry, "the lease was renewed past its first expiry")
        assert not slot.lost.is_set()
        assert await sem.expired() == []
        assert slot.lease.token == first.token
        assert (await slot.confirm()).token == first.token

    assert await sem.usage() == {"waiters": 0}
    assert not any(task.get_name().startswith("semaphore-renew") for task in asyncio.all_tasks())


async def test_hold_releases_when_the_block_is_cancelled(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    inside = asyncio.Event()

    async def job() -> None:
        async with hold(sem, "a", [CLUSTER]):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(job(), name="job")
    await asyncio.wait_for(inside.wait(), PATIENCE_S)
    assert await sem.usage() == {"cluster": 1, "waiters": 0}

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await sem.usage() == {"waiters": 0}


async def test_hold_releases_when_the_block_raises(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    with pytest.raises(RuntimeError, match="boom"):
        async with hold(sem, "a", [CLUSTER]):
            raise RuntimeError("boom")
    assert await sem.holders() == []


async def test_hold_keep_leaves_the_slot_for_the_reconciler(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    async with hold(sem, "a", [CLUSTER]) as slot:
        slot.keep()
        token = slot.lease.token

    assert [(info.holder, info.token) for info in await sem.holders()] == [("a", token)]


async def test_hold_sets_lost_when_adopted_and_does_not_release(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    reconciler = make_semaphore(own_client=True)
    slot: HeldSlot
    async with hold(sem, "a", [CLUSTER], renew_every_s=0.05) as slot:
        adopted = await reconciler.adopt("a", expected_token=slot.lease.token)
        await asyncio.wait_for(slot.lost.wait(), PATIENCE_S)
        with pytest.raises(SemaphoreLost):
            await slot.confirm()

    assert [(info.holder, info.token) for info in await reconciler.holders()] == [("a", adopted.token)]


# Key formats ---------------------------------------------------------------------------------------


def test_semaphore_keys_share_one_hash_tag() -> None:
    sem_keys = keys.semaphore_keys("migrations")
    every = [
        sem_keys.holders,
        sem_keys.fence,
        sem_keys.waiters,
        sem_keys.waiter_priorities,
        sem_keys.reservations,
        sem_keys.scopes,
        sem_keys.released_channel,
        sem_keys.lease("d1/ns/vm/0"),
        sem_keys.scope(keys.node_scope("n1")),
    ]
    assert all(key.startswith("{drainctl:sem:migrations}:") for key in every)
    assert len(set(every)) == len(every)
    with pytest.raises(ValueError, match="braces"):
        keys.semaphore_keys("a}b")


def test_project_key_and_job_id_formats() -> None:
    assert keys.drain_key("d1") == "drainctl:drain:d1"
    assert keys.drain_events_key("d1") == "drainctl:drain:d1:events"
    assert keys.drain_vms_key("d1") == "drainctl:drain:d1:vms"
    assert keys.drain_nodes_key("d1") == "drainctl:drain:d1:nodes"
    assert keys.drain_lock_key("d1") == "drainctl:drain:d1:lock"
    assert keys.DRAINS_INDEX == "drainctl:drains"
    assert keys.node_lock_key("n1") == "drainctl:node:n1:drain"
    assert keys.idempotency_key("k") == "drainctl:idem:k"
    assert keys.plan_job_id("d1") == "plan:d1"
    assert keys.migrate_job_id("d1", "ns", "vm", attempt=2) == "migrate:d1:ns/vm:2"
    assert keys.finish_job_id("d1", "n1") == "finish:d1:n1"
    assert keys.migration_holder_id("d1", "ns", "vm", attempt=2) == "d1/ns/vm/2"
    with pytest.raises(ValueError, match="drain id"):
        keys.drain_key("")


# ------------------------------------------------------------------------------------ one scope among choices
def _inbound(*nodes: str, limit: int = 1) -> Callable[[], Awaitable[list[Scope]]]:
    async def choose() -> list[Scope]:
        return [Scope(keys.inbound_scope(n), limit) for n in nodes]
    return choose


async def test_a_choice_goes_to_the_option_with_room_and_fewest_holders(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)
    first = await sem.acquire("a", [cluster], choose=_inbound("n1", "n2", limit=2))
    assert first.chosen == keys.inbound_scope("n1")  # a tie: the caller's order decides
    assert first.scopes == tuple(sorted((keys.CLUSTER_SCOPE, keys.inbound_scope("n1"))))
    second = await sem.acquire("b", [cluster], choose=_inbound("n1", "n2", limit=2))
    assert second.chosen == keys.inbound_scope("n2")  # fewer holders wins over the order
    await sem.acquire("c", [cluster], choose=_inbound("n1", limit=2))
    fourth = await sem.acquire("d", [cluster], choose=_inbound("n1", "n2", limit=2))
    assert fourth.chosen == keys.inbound_scope("n2")  # n1 is full
    usage = await sem.usage()
    assert usage[keys.inbound_scope("n1")] == 2 and usage[keys.inbound_scope("n2")] == 2 and usage["cluster"] == 4
    await sem.release("a")
    assert (await sem.usage())[keys.inbound_scope("n1")] == 1


async def test_a_choice_waits_while_every_option_is_full_then_takes_the_freed_one(
    make_semaphore: SemaphoreFactory,
) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)
    await sem.acquire("a", [cluster], choose=_inbound("n1"))
    await sem.acquire("b", [cluster], choose=_inbound("n2"))
    waiting = asyncio.create_task(sem.acquire("c", [cluster], choose=_inbound("n1", "n2")))

    async def is_waiting() -> bool:
        return await sem.waiters() == 1

    await eventually(is_waiting, "c waiting")
    assert not waiting.done()
    await sem.release("b")
    lease = await asyncio.wait_for(waiting, PATIENCE_S)
    assert lease.chosen == keys.inbound_scope("n2")
    assert await sem.waiters() == 0


async def test_a_choice_takes_nothing_while_a_fixed_scope_is_full(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    await sem.acquire("a", [CLUSTER], choose=_inbound("n1"))
    with pytest.raises(TimeoutError):
        await sem.acquire("b", [CLUSTER], choose=_inbound("n2"), timeout_s=0.5)
    usage = await sem.usage()
    assert keys.inbound_scope("n2") not in usage and usage[keys.CLUSTER_SCOPE] == 1 and usage["waiters"] == 0


async def test_a_holder_keeps_its_earlier_choice(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)
    first = await sem.acquire("a", [cluster], choose=_inbound("n1"))
    again = await sem.acquire("a", [cluster], choose=_inbound("n2", "n3"))
    assert again.chosen == first.chosen == keys.inbound_scope("n1") and again.token == first.token
    assert keys.inbound_scope("n2") not in await sem.usage()


async def test_a_chooser_that_raises_leaves_nothing_behind(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)

    async def nothing_fits() -> list[Scope]:
        raise LookupError("no target fits")

    with pytest.raises(LookupError, match="no target fits"):
        await sem.acquire("a", [cluster], choose=nothing_fits)
    assert await sem.usage() == {"waiters": 0}
    assert await sem.holders() == []


async def test_a_choice_offered_twice_counts_once_with_its_first_limit(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)
    n1 = keys.inbound_scope("n1")

    async def twice() -> list[Scope]:
        return [Scope(n1, 1), Scope(keys.inbound_scope("n2"), 1), Scope(n1, 5)]

    assert (await sem.acquire("a", [cluster], choose=twice)).chosen == n1
    assert (await sem.acquire("b", [cluster], choose=twice)).chosen == keys.inbound_scope("n2")
    with pytest.raises(TimeoutError):  # n1's limit is 1 (its first offer), not 5
        await sem.acquire("c", [cluster], choose=twice, timeout_s=0.5)


# ------------------------------------------------------------------------------------ weighted (solo) grants
async def test_a_weighted_grant_takes_the_whole_scope_and_its_release_frees_it(
    make_semaphore: SemaphoreFactory,
) -> None:
    sem = make_semaphore()
    node = keys.node_scope("n1")
    solo = await sem.try_acquire("solo", [Scope(keys.CLUSTER_SCOPE, 10), Scope(node, 3, weight=3)])
    assert solo is not None
    assert (await sem.usage())[node] == 3
    assert await sem.try_acquire("other", [Scope(keys.CLUSTER_SCOPE, 10), Scope(node, 3)]) is None
    assert [info.holder for info in await sem.holders()] == ["solo"]
    assert await sem.release("solo")
    assert await sem.usage() == {"waiters": 0}
    assert await sem.try_acquire("other", [Scope(node, 3)]) is not None


async def test_a_weighted_grant_waits_for_an_empty_scope(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    node = keys.node_scope("n1")
    await sem.acquire("a", [Scope(node, 2)])
    assert await sem.try_acquire("solo", [Scope(node, 2, weight=2)]) is None  # one slot free is not enough
    await sem.release("a")
    assert await sem.try_acquire("solo", [Scope(node, 2, weight=2)]) is not None


async def test_a_weighted_choice_takes_only_an_empty_option(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    cluster = Scope(keys.CLUSTER_SCOPE, 10)
    await sem.acquire("a", [cluster], choose=_inbound("n1", limit=2))

    async def whole() -> list[Scope]:
        return [Scope(keys.inbound_scope(n), 2, weight=2) for n in ("n1", "n2")]

    lease = await sem.acquire("solo", [cluster], choose=whole)
    assert lease.chosen == keys.inbound_scope("n2")
    usage = await sem.usage()
    assert usage[keys.inbound_scope("n2")] == 2 and usage[keys.CLUSTER_SCOPE] == 2
    await sem.release("solo")
    assert keys.inbound_scope("n2") not in await sem.usage()


async def test_a_waiting_weighted_grant_is_not_starved_by_newcomers(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    other = make_semaphore(own_client=True)
    node = keys.node_scope("n1")
    await sem.acquire("a", [Scope(node, 2)])
    solo = asyncio.create_task(sem.acquire("solo", [Scope(node, 2, weight=2)]))

    async def reserved() -> bool:
        return bool(await sem._redis.hlen(sem.keys.reservations))  # type: ignore[misc]

    await eventually(reserved, "the solo waiter reserved its node")
    # A slot is free, but it is reserved: a newcomer waits instead of taking it, again and again.
    assert await other.try_acquire("b", [Scope(node, 2)]) is None
    with pytest.raises(TimeoutError):
        await other.acquire("c", [Scope(node, 2)], timeout_s=0.5)
    await sem.release("a")
    lease = await asyncio.wait_for(solo, PATIENCE_S)
    assert lease.scopes == (node,)
    assert not await reserved()  # the grant ends the reservation
    await sem.release("solo")
    assert await other.try_acquire("b", [Scope(node, 2)]) is not None


async def test_a_cancelled_weighted_waiter_leaves_no_reservation(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    node = keys.node_scope("n1")
    await sem.acquire("a", [Scope(node, 2)])
    solo = asyncio.create_task(sem.acquire("solo", [Scope(node, 2, weight=2)]))

    async def reserved() -> bool:
        return bool(await sem._redis.hlen(sem.keys.reservations))  # type: ignore[misc]

    await eventually(reserved, "the solo waiter reserved its node")
    solo.cancel()
    with pytest.raises(asyncio.CancelledError):
        await solo
    assert not await reserved()
    assert await sem.try_acquire("b", [Scope(node, 2)]) is not None


async def test_a_dead_weighted_waiter_reserves_nothing(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    node = keys.node_scope("n1")
    # What a waiter that died left: a reservation whose heartbeat (its waiters entry) is gone.
    await sem._redis.hset(sem.keys.reservations, "dead#1", f"1\n{sem.keys.scope(node)}")  # type: ignore[misc]
    assert await sem.try_acquire("b", [Scope(node, 2)]) is not None
    assert not await sem._redis.hlen(sem.keys.reservations)  # type: ignore[misc]


async def test_two_weighted_waiters_of_one_scope_go_in_turn(make_semaphore: SemaphoreFactory) -> None:
    sem = make_semaphore()
    node = keys.node_scope("n1")
    await sem.acquire("a", [Scope(node, 2)])
    first = asyncio.create_task(sem.acquire("solo-1", [Scope(node, 2, weight=2)]))

    async def reservers() -> int:
        return int(await sem._redis.hlen(sem.keys.reservations))  # type: ignore[misc]

    await eventually(lambda: _at_least(reservers, 1), "solo-1 reserved")
    second = asyncio.create_task(sem.acquire("solo-2", [Scope(node, 2, weight=2)]))
    await eventually(lambda: _at_least(reservers, 2), "solo-2 reserved")
    await sem.release("a")
    await asyncio.wait_for(first, PATIENCE_S)  # the earlier reserver goes first ...
    assert not second.done()
    await sem.release("solo-1")
    await asyncio.wait_for(second, PATIENCE_S)  # ... then the other: no deadlock between reservers
    await sem.release("solo-2")
    assert await sem.usage() == {"waiters": 0}


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


def test_a_scope_weight_must_fit_its_limit() -> None:
    with pytest.raises(ValueError, match="weight must be between 1 and the limit 2"):
        Scope("node:n1", 2, weight=3)
