"""A counting semaphore in Redis with several scopes per lease, fencing tokens and visible waiters.

What it promises
----------------
* A lease takes one slot in every scope it names (for example ``cluster`` and ``node:worker-3``), all
  or nothing, in one Lua script. No scope ever holds more leases than the limit the caller passes.
* A scope may be taken with a weight (``Scope(name, limit, weight=limit)``: the whole scope): the lease
  counts ``weight`` times there, atomically with its other scopes, and its release frees all of it. The
  migrate job's solo lane takes its source node's and its target's inbound scopes whole this way. A waiter
  for a weighted grant reserves the weighted scopes it waits for (and, once those have room, the choice it
  would take): while it waits, no other acquisition is granted there, so slots freed there go to it instead
  of to newcomers; two reservers of one scope go in the order they began to wait. A reservation lives only
  as long as its waiter's heartbeat, so a dead waiter reserves nothing.
* A lease may also take one scope picked among choices (``acquire(..., choose=...)``): the choice with
  room and the fewest holders, decided in the same script as the other scopes. The migrate job passes the
  inbound scopes of the targets a VM may go to, so the inbound limit holds whatever the worker's view says.
* Every grant (and every adoption) gets a fencing token from one counter per semaphore, so a later
  owner always has a larger token than an earlier one.
* Only the Redis clock is used (``redis.call('TIME')``); client clocks may disagree freely.
* A lease expires when it is not renewed, but an expired lease is NOT freed: it keeps its slots and
  shows up in :meth:`RedisSemaphore.expired`. The slot stands for a VirtualMachineInstanceMigration
  that may still run after its worker died, so only someone who can see the cluster decides: it
  either re-adopts the lease (:meth:`RedisSemaphore.adopt`) or releases it. The owner of an expired
  lease can no longer renew it (:class:`SemaphoreLost`); it must stop touching its migration.
* Waiting acquirers are visible (:meth:`RedisSemaphore.waiters`) and heartbeat, so a waiter whose
  process died disappears by itself. They wake on a pub/sub message published by every release and
  otherwise poll at a bounded interval, because pub/sub messages are lost while a subscriber
  reconnects.
* Cancelling :meth:`RedisSemaphore.acquire` leaves neither a waiter nor a slot behind, even when the
  cancellation lands after the script granted the slot but before the caller saw the answer.
  Releases run in a shielded task, so they complete even when the caller is cancelled.

What it does not do
-------------------
* It is not fair: a waiter that polls at the right moment may overtake an older one. Strict FIFO
  across scopes would let a waiter for a busy node block waiters for idle nodes.
* It does not look at the cluster. Reaping expired leases is the reconciler's job.
* Fencing tokens come from a Redis counter; a Redis that loses its data restarts them.

Keys (all under one Redis Cluster hash tag) are described in :mod:`orchestrator.keys`. Lua scripts
get every key in ``KEYS``; they never build a key name.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from orchestrator.keys import SemaphoreKeys, semaphore_keys

__all__ = [
    "HeldSlot",
    "HolderInfo",
    "Lease",
    "RedisSemaphore",
    "Scope",
    "SemaphoreLost",
    "hold",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

Chooser = Callable[[], Awaitable[Sequence["Scope"]]]
"""Returns the scopes an acquisition may pick one of, best first (see :meth:`RedisSemaphore.acquire`)."""

WAITERS_KEY: Final = "waiters"
"""Key of the waiter count in :meth:`RedisSemaphore.usage`; therefore not a valid scope name."""

_SCOPE_SEPARATOR: Final = "\n"
# How often a release is retried when a concurrent re-grant changed the holder's scopes between
# reading them and running the script. Each retry needs a full release+acquire to interleave.
_RELEASE_RETRIES: Final = 5

# The time prologue shared by every script: milliseconds on the Redis clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Reservations, shared by both acquire scripts and the release. An entry of the reservations hash is the
# Redis ms its waiter began to reserve, then the scope keys it reserves (newline-joined). `reserved` says
# whether a live waiter other than `me` that goes before `me` (it reserved earlier; `me` reserves nothing
# or later) reserves `scope_key`; entries of waiters whose heartbeat lapsed are dropped on the way.
_RESERVATIONS = """
local function split(text)
  local parts = {}
  for part in string.gmatch(text, '[^\\n]+') do
    parts[#parts + 1] = part
  end
  return parts
end
local function reserved(res_key, waiters_key, me, scope_key)
  local my_since = nil
  if me ~= '' then
    local mine = redis.call('HGET', res_key, me)
    if mine then
      my_since = tonumber(split(mine)[1])
    end
  end
  for _, other in ipairs(redis.call('HKEYS', res_key)) do
    if other ~= me then
      if not redis.call('ZSCORE', waiters_key, other) then
        redis.call('HDEL', res_key, other)
      else
        local parts = split(redis.call('HGET', res_key, other))
        local since = tonumber(parts[1])
        if my_since == nil or since < my_since or (since == my_since and other < me) then
          for j = 2, #parts do
            if parts[j] == scope_key then
              return true
            end
          end
        end
      end
    end
  end
  return false
end
local function reserve(res_key, me, now, scope_keys)
  if me == '' or #scope_keys == 0 then
    return
  end
  local since = now
  local mine = redis.call('HGET', res_key, me)
  if mine then
    since = tonumber(split(mine)[1])
  end
  redis.call('HSET', res_key, me, string.format('%d', since) .. '\\n' .. table.concat(scope_keys, '\\n'))
end
local function take(key, holder, expires, weight)
  redis.call('ZADD', key, expires, holder)
  for k = 2, weight do
    redis.call('ZADD', key, expires, holder .. '\\n' .. k)
  end
end
"""

# Waiting with a priority, shared by both acquire scripts. A waiter's entry in the priority hash (the last
# KEY) is its priority, then the scope keys and limits it waits for (newline-joined; every key shares the
# hash tag; a limit there is the limit less the scope's weight, plus one, so "holders < limit" means room for
# the weight). `defer` says whether a live waiter with a smaller number has room in all its scopes right now
# (room reserved by another waiter is no room): then the caller waits, so a freed slot goes to the most
# urgent waiter that can use it.
_PRIORITY = """
local function defer(prio_key, waiters_key, res_key, waiter, mine)
  if mine == '' then
    return false
  end
  mine = tonumber(mine)
  for _, other in ipairs(redis.call('HKEYS', prio_key)) do
    if other ~= waiter then
      if not redis.call('ZSCORE', waiters_key, other) then
        redis.call('HDEL', prio_key, other)
      else
        local parts = {}
        for part in string.gmatch(redis.call('HGET', prio_key, other), '[^\\n]+') do
          parts[#parts + 1] = part
        end
        if tonumber(parts[1]) < mine then
          local room = true
          for j = 2, #parts - 1, 2 do
            if redis.call('ZCARD', parts[j]) >= tonumber(parts[j + 1])
                or reserved(res_key, waiters_key, other, parts[j]) then
              room = false
              break
            end
          end
          if room then
            return true
          end
        end
      end
    end
  end
  return false
end
"""

# KEYS: 1 holders zset, 2 fence counter, 3 lease hash, 4 waiters zset, 5 scope-name set,
#       6..5+n scope zsets, 6+n waiter-priority hash, 7+n reservations hash
# ARGV: 1 holder, 2 lease ms, 3 meta json, 4 acquisition id, 5 waiter id or '', 6 waiter ttl ms,
#       7 joined scope names, 8..7+n scope names, 8+n..7+2n limits, 8+2n priority or '', 9+2n its entry,
#       10+2n..9+3n weights
# Returns {status, token, expires_at_ms, joined scopes}; status 1 granted, 2 renewed (re-entrant),
# 3 re-adopted an expired lease of the same holder (new token), 0 no room, -1 held with other scopes.
_ACQUIRE_LUA = (
    _NOW
    + _RESERVATIONS
    + _PRIORITY
    + """
local holder = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local waiter = ARGV[5]
local n = #KEYS - 7
local prio_key = KEYS[#KEYS - 1]
local res_key = KEYS[#KEYS]
local prio = ARGV[8 + 2 * n]
local weighted = {}
local joined_weights = {}
for i = 1, n do
  local w = tonumber(ARGV[9 + 2 * n + i])
  joined_weights[i] = tostring(w)
  if w > 1 then
    weighted[#weighted + 1] = KEYS[5 + i]
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local token = redis.call('HGET', KEYS[3], 'token')
if token then
  local scopes = redis.call('HGET', KEYS[3], 'scopes')
  if scopes ~= ARGV[7] then
    return {-1, tonumber(token), 0, scopes}
  end
  local status = 2
  token = tonumber(token)
  if tonumber(redis.call('HGET', KEYS[3], 'expires_at_ms')) <= now then
    token = redis.call('INCR', KEYS[2])
    status = 3
  end
  local expires = now + lease_ms
  redis.call('HSET', KEYS[3], 'token', token, 'expires_at_ms', expires)
  redis.call('ZADD', KEYS[1], expires, holder)
  for i = 1, n do
    redis.call('ZADD', KEYS[5 + i], expires, holder)
  end
  if waiter ~= '' then
    redis.call('ZREM', KEYS[4], waiter)
    redis.call('HDEL', prio_key, waiter)
    redis.call('HDEL', res_key, waiter)
  end
  return {status, token, expires, scopes}
end
local function wait()
  if waiter ~= '' then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), waiter)
    if prio ~= '' then
      redis.call('HSET', prio_key, waiter, ARGV[9 + 2 * n])
    end
    reserve(res_key, waiter, now, weighted)
  end
  return {0, 0, now, ''}
end
for i = 1, n do
  if redis.call('ZCARD', KEYS[5 + i]) + tonumber(joined_weights[i]) > tonumber(ARGV[7 + n + i])
      or reserved(res_key, KEYS[4], waiter, KEYS[5 + i]) then
    return wait()
  end
end
if defer(prio_key, KEYS[4], res_key, waiter, prio) then
  return wait()
end
token = redis.call('INCR', KEYS[2])
local expires = now + lease_ms
redis.call('HSET', KEYS[3], 'token', token, 'scopes', ARGV[7], 'expires_at_ms', expires,
           'acquired_at_ms', now, 'meta', ARGV[3], 'acq', ARGV[4])
if #weighted > 0 then
  redis.call('HSET', KEYS[3], 'weights', table.concat(joined_weights, '\\n'))
end
redis.call('ZADD', KEYS[1], expires, holder)
for i = 1, n do
  take(KEYS[5 + i], holder, expires, tonumber(joined_weights[i]))
  redis.call('SADD', KEYS[5], ARGV[7 + i])
end
if waiter ~= '' then
  redis.call('ZREM', KEYS[4], waiter)
  redis.call('HDEL', prio_key, waiter)
  redis.call('HDEL', res_key, waiter)
end
return {1, token, expires, ARGV[7]}
"""
)

# Like _ACQUIRE_LUA for a holder without a lease, plus one scope picked among choices.
# KEYS: 1 holders zset, 2 fence counter, 3 lease hash, 4 waiters zset, 5 scope-name set,
#       6..5+n fixed scope zsets, 6+n..5+n+m choice scope zsets, 6+n+m waiter-priority hash,
#       7+n+m reservations hash
# ARGV: 1 holder, 2 lease ms, 3 meta json, 4 acquisition id, 5 waiter id or '', 6 waiter ttl ms, 7 n, 8 m,
#       9..8+n fixed names, 9+n..8+2n fixed limits, 9+2n..8+2n+m choice names, 9+2n+m..8+2n+2m choice limits,
#       9+2n+2m priority or '', 10+2n+2m its entry (the fixed scopes only),
#       11+2n+2m..10+3n+2m fixed weights, 11+3n+2m..10+3n+3m choice weights
# Returns {status, token, expires_at_ms, joined scopes, chosen}; status 1 granted, 0 a fixed scope is full,
# -2 every choice is full, -1 the holder already holds a lease (the caller checks for that first).
_ACQUIRE_CHOICE_LUA = (
    _NOW
    + _RESERVATIONS
    + _PRIORITY
    + """
local holder = ARGV[1]
local waiter = ARGV[5]
local n = tonumber(ARGV[7])
local m = tonumber(ARGV[8])
local prio_key = KEYS[#KEYS - 1]
local res_key = KEYS[#KEYS]
local prio = ARGV[9 + 2 * n + 2 * m]
local function weight(i)
  return tonumber(ARGV[10 + 2 * n + 2 * m + i])
end
local weighted = {}
local any_weight = false
for i = 1, n + m do
  if weight(i) > 1 then
    any_weight = true
    if i <= n then
      weighted[#weighted + 1] = KEYS[5 + i]
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local token = redis.call('HGET', KEYS[3], 'token')
if token then
  return {-1, tonumber(token), 0, redis.call('HGET', KEYS[3], 'scopes'), ''}
end
local function wait(status, also)
  if waiter ~= '' then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), waiter)
    if prio ~= '' then
      redis.call('HSET', prio_key, waiter, ARGV[10 + 2 * n + 2 * m])
    end
    local keys = {unpack(weighted)}
    if also ~= nil then
      keys[#keys + 1] = also
    end
    reserve(res_key, waiter, now, keys)
  end
  return {status, 0, now, '', ''}
end
for i = 1, n do
  if redis.call('ZCARD', KEYS[5 + i]) + weight(i) > tonumber(ARGV[8 + n + i])
      or reserved(res_key, KEYS[4], waiter, KEYS[5 + i]) then
    return wait(0, nil)
  end
end
if defer(prio_key, KEYS[4], res_key, waiter, prio) then
  return wait(0, nil)
end
local best, best_count = nil, nil
local open, open_count = nil, nil
for j = 1, m do
  local key = KEYS[5 + n + j]
  local count = redis.call('ZCARD', key)
  if not reserved(res_key, KEYS[4], waiter, key) then
    if count + weight(n + j) <= tonumber(ARGV[8 + 2 * n + m + j]) and (best == nil or count < best_count) then
      best, best_count = j, count
    end
    if open == nil or count < open_count then
      open, open_count = j, count
    end
  end
end
if best == nil then
  -- A weighted waiter whose fixed scopes have room reserves the least loaded choice it may wait for.
  if any_weight and open ~= nil and weight(n + open) > 1 then
    return wait(-2, KEYS[5 + n + open])
  end
  return wait(-2, nil)
end
local entries = {}
for i = 1, n do
  entries[i] = {ARGV[8 + i], weight(i)}
end
local chosen = ARGV[8 + 2 * n + best]
entries[n + 1] = {chosen, weight(n + best)}
table.sort(entries, function(a, b) return a[1] < b[1] end)
local names, weights = {}, {}
for i, entry in ipairs(entries) do
  names[i] = entry[1]
  weights[i] = tostring(entry[2])
end
local joined = table.concat(names, '\\n')
token = redis.call('INCR', KEYS[2])
local expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[3], 'token', token, 'scopes', joined, 'expires_at_ms', expires,
           'acquired_at_ms', now, 'meta', ARGV[3], 'acq', ARGV[4])
if any_weight then
  redis.call('HSET', KEYS[3], 'weights', table.concat(weights, '\\n'))
end
redis.call('ZADD', KEYS[1], expires, holder)
for i = 1, n do
  take(KEYS[5 + i], holder, expires, weight(i))
  redis.call('SADD', KEYS[5], ARGV[8 + i])
end
take(KEYS[5 + n + best], holder, expires, weight(n + best))
redis.call('SADD', KEYS[5], chosen)
if waiter ~= '' then
  redis.call('ZREM', KEYS[4], waiter)
  redis.call('HDEL', prio_key, waiter)
  redis.call('HDEL', res_key, waiter)
end
return {1, token, expires, joined, chosen}
"""
)

# KEYS: 1 holders zset, 2 lease hash, 3..2+n scope zsets
# ARGV: 1 holder, 2 token, 3 lease ms
# Returns {1, expires_at_ms} renewed, {0, 0} gone, {-1, token} other token, {-2, token} expired.
_RENEW_LUA = (
    _NOW
    + """
local token = redis.call('HGET', KEYS[2], 'token')
if not token then
  return {0, 0}
end
if tonumber(token) ~= tonumber(ARGV[2]) then
  return {-1, tonumber(token)}
end
if tonumber(redis.call('HGET', KEYS[2], 'expires_at_ms')) <= now then
  return {-2, tonumber(token)}
end
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], 'expires_at_ms', expires)
redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[1])
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expires, ARGV[1])
end
return {1, expires}
"""
)

# KEYS: 1 holders zset, 2 fence counter, 3 lease hash, 4..3+n scope zsets
# ARGV: 1 holder, 2 lease ms, 3 joined scope names, 4 expected token or ''
# Returns {1, token, expires_at_ms} adopted, {0, 0, 0} gone, {-1, token, 0} other token,
# {-2, token, 0} the caller's view of the scopes is stale.
_ADOPT_LUA = (
    _NOW
    + """
local token = redis.call('HGET', KEYS[3], 'token')
if not token then
  return {0, 0, 0}
end
if ARGV[4] ~= '' and tonumber(token) ~= tonumber(ARGV[4]) then
  return {-1, tonumber(token), 0}
end
if redis.call('HGET', KEYS[3], 'scopes') ~= ARGV[3] then
  return {-2, tonumber(token), 0}
end
token = redis.call('INCR', KEYS[2])
local expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[3], 'token', token, 'expires_at_ms', expires)
redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[1])
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expires, ARGV[1])
end
return {1, token, expires}
"""
)

# KEYS: 1 holders zset, 2 lease hash, 3 scope-name set, 4 waiters zset, 5..4+n scope zsets,
#       5+n waiter-priority hash, 6+n reservations hash
# ARGV: 1 holder, 2 token or '', 3 acquisition id or '', 4 joined scope names, 5 waiter id or '',
#       6 release channel, 7..6+n scope names
# Returns 1 released, 0 not released (gone or not the owner), -1 the caller's scopes are stale.
# A weighted lease's extra members (holder, newline, 2..weight) go with it.
_RELEASE_LUA = """
local last = #KEYS - 2
if ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[4], ARGV[5])
  redis.call('HDEL', KEYS[#KEYS - 1], ARGV[5])
  redis.call('HDEL', KEYS[#KEYS], ARGV[5])
end
local token = redis.call('HGET', KEYS[2], 'token')
if not token then
  return 0
end
if ARGV[2] ~= '' and tonumber(token) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], 'acq') ~= ARGV[3] then
  return 0
end
if redis.call('HGET', KEYS[2], 'scopes') ~= ARGV[4] then
  return -1
end
local weights = {}
local stored = redis.call('HGET', KEYS[2], 'weights')
if stored then
  for part in string.gmatch(stored, '[^\\n]+') do
    weights[#weights + 1] = tonumber(part)
  end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 5, last do
  redis.call('ZREM', KEYS[i], ARGV[1])
  for k = 2, weights[i - 4] or 1 do
    redis.call('ZREM', KEYS[i], ARGV[1] .. '\\n' .. k)
  end
  if redis.call('ZCARD', KEYS[i]) == 0 then
    redis.call('SREM', KEYS[3], ARGV[i + 2])
  end
end
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
"""

# KEYS: 1 waiters zset. Returns the number of live waiters after dropping those whose heartbeat
# lapsed.
_WAITERS_LUA = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)


class SemaphoreLost(Exception):
    """The lease is gone, expired or owned by another token: stop acting as its holder."""


@dataclass(frozen=True)
class Scope:
    """One counted resource and the most leases it may carry at once.

    Names are ``cluster``, ``node:<name>`` (outbound) or ``inbound:<name>``; see
    :mod:`orchestrator.keys`.
    """

    name: str
    limit: int
    weight: int = 1
    """How many of the scope's slots the lease takes there (``limit``: the whole scope, a solo lane)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("scope name must not be empty")
        if _SCOPE_SEPARATOR in self.name:
            raise ValueError(f"scope name must not contain a newline: {self.name!r}")
        if self.name == WAITERS_KEY:
            raise ValueError(f"scope name {WAITERS_KEY!r} is reserved for the waiter count")
        if self.limit < 1:
            raise ValueError(f"scope {self.name!r}: limit must be >= 1, got {self.limit}")
        if not 1 <= self.weight <= self.limit:
            raise ValueError(f"scope {self.name!r}: weight must be between 1 and the limit {self.limit}, "
                             f"got {self.weight}")


@dataclass(frozen=True)
class Lease:
    """A granted slot in every scope of ``scopes`` (sorted by name).

    ``chosen`` is the scope picked among the choices of :meth:`RedisSemaphore.acquire` (``choose``), if any.
    """

    holder: str
    token: int
    scopes: tuple[str, ...]
    expires_at_ms: int
    chosen: str | None = None


@dataclass(frozen=True)
class HolderInfo:
    """A lease as stored in Redis, with whether it had expired when it was read."""

    holder: str
    token: int
    scopes: tuple[str, ...]
    expires_at_ms: int
    expired: bool
    acquired_at_ms: int
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _text(value: object) -> str:
    # Works with and without decode_responses on the client.
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _canonical(scopes: Sequence[Scope]) -> tuple[Scope, ...]:
    if not scopes:
        raise ValueError("at least one scope is required")
    ordered = tuple(sorted(scopes, key=lambda s: s.name))
    for before, after in itertools.pairwise(ordered):
        if before.name == after.name:
            raise ValueError(f"scope {before.name!r} is given twice")
    return ordered


def _meta_json(meta: Mapping[str, str] | None) -> str:
    meta = meta or {}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"meta must map str to str, got {key!r}: {value!r}")
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"))


class RedisSemaphore:
    """A multi-scope counting semaphore whose slots are leases with fencing tokens.

    Limits are passed with every acquisition (a :class:`Scope` carries its limit), so a changed
    setting applies to the next grant; leases granted earlier are never revoked by a lower limit.
    One instance may be shared by many tasks; instances with the same ``name`` share the semaphore.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        name: str = "migrations",
        lease_ttl_s: float = 30.0,
        poll_interval_s: float = 1.0,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self._redis = redis
        self._keys: SemaphoreKeys = semaphore_keys(name)
        self._lease_ms = max(1, round(lease_ttl_s * 1000))
        self._poll_interval_s = poll_interval_s
        # A waiter heartbeats on every attempt, at least once per poll interval; three missed
        # heartbeats (plus slack for a slow round trip) mean its process is gone.
        self._waiter_ttl_ms = round((3 * poll_interval_s + 2.0) * 1000)
        self._acquire_script = redis.register_script(_ACQUIRE_LUA)
        self._acquire_choice_script = redis.register_script(_ACQUIRE_CHOICE_LUA)
        self._renew_script = redis.register_script(_RENEW_LUA)
        self._adopt_script = redis.register_script(_ADOPT_LUA)
        self._release_script = redis.register_script(_RELEASE_LUA)
        self._waiters_script = redis.register_script(_WAITERS_LUA)
        # Shielded clean-up tasks outlive a cancelled caller; keep them referenced until done.
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        """The semaphore's name; instances with the same name share slots."""
        return self._keys.name

    @property
    def keys(self) -> SemaphoreKeys:
        """The Redis keys of this semaphore."""
        return self._keys

    @property
    def lease_ttl_s(self) -> float:
        """How long a lease lasts without renewal, in seconds of the Redis clock."""
        return self._lease_ms / 1000

    # Acquisition ----------------------------------------------------------------------------------

    async def try_acquire(
        self, holder: str, scopes: Sequence[Scope], *, meta: Mapping[str, str] | None = None,
        priority: float | None = None,
    ) -> Lease | None:
        """Take a slot in every scope at once, or nothing; never waits.

        Expired-but-unreleased leases count as occupied. If ``holder`` already holds a lease on the
        same scopes, it is renewed and returned with its token (a new token if it had expired,
        which fences out the previous owner); ``meta`` of an existing lease is kept. Raises
        ``ValueError`` when the holder holds a lease on other scopes.
        """
        ordered = _canonical(scopes)
        meta_json = _meta_json(meta)
        acquisition = uuid.uuid4().hex
        try:
            return await self._attempt(holder, ordered, meta_json, acquisition=acquisition, waiter="",
                                       priority=priority)
        except BaseException:
            await self._abandon(holder, ordered, acquisition=acquisition, waiter="")
            raise

    async def acquire(
        self,
        holder: str,
        scopes: Sequence[Scope],
        *,
        meta: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        on_wait: Callable[[], Awaitable[None]] | None = None,
        choose: Chooser | None = None,
        priority: float | None = None,
    ) -> Lease:
        """Like :meth:`try_acquire`, but wait for room; raise ``TimeoutError`` after ``timeout_s``.

        ``on_wait`` is awaited once, when the first attempt found no room, so the caller can say
        why it waits. While waiting, the caller is listed in :meth:`waiters`. Timeouts are measured
        on the event loop's clock.

        With ``choose``, the lease also takes a slot in one scope picked among the choices it returns
        (for example the inbound scopes of the nodes a migration may go to), in the same script as the
        other scopes: the choice with the fewest holders that has room, the earliest on a tie. ``choose``
        is awaited before every attempt, so the choices follow the caller's view while it waits; an
        exception it raises (no choice at all) ends the acquisition. Nothing is held while waiting, so
        waiters for different choices never deadlock. A holder that already holds a lease on the other
        scopes plus at most one more keeps that lease (its earlier choice stands, see ``Lease.chosen``).

        With a ``priority`` the caller goes after every waiter of a smaller priority number that has room in
        all its (fixed) scopes, so a freed slot goes to the most urgent waiter that can use it rather than to
        whoever polls first; callers without a priority neither wait for others nor are waited for.
        """
        ordered = _canonical(scopes)
        meta_json = _meta_json(meta)
        earlier: str | None = None
        if choose is not None:
            held = await self._held_choice(holder, ordered)
            if held is not None:
                ordered, earlier = held
                choose = None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        acquisition = uuid.uuid4().hex
        waiter = f"{holder}#{acquisition}"
        pubsub: PubSub | None = None
        try:
            # The uncontended path needs no subscription (a dedicated connection).
            lease = await self._attempt(holder, ordered, meta_json, acquisition=acquisition, waiter="",
                                        choose=choose, priority=priority)
            if lease is not None:
                return lease if earlier is None else replace(lease, chosen=earlier)
            log.info("semaphore.waiting", semaphore=self.name, holder=holder, scopes=_names(ordered))
            if on_wait is not None:
                await on_wait()
            # Subscribe (and wait for the confirmation) before registering as a waiter: a release
            # after the next attempt must reach us, and anyone who sees us waiting may rely on it.
            pubsub = await self._subscribe()
            while True:
                lease = await self._attempt(
                    holder, ordered, meta_json, acquisition=acquisition, waiter=waiter, choose=choose,
                    priority=priority,
                )
                if lease is not None:
                    return lease if earlier is None else replace(lease, chosen=earlier)
                wait_s = self._poll_interval_s * random.uniform(0.8, 1.0)
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"semaphore {self.name!r}: no room for {holder!r} in "
                            f"{_names(ordered)} within {timeout_s} s"
                        )
                    wait_s = min(wait_s, remaining)
                pubsub = await self._wait_for_release(pubsub, wait_s)
        except BaseException:
            await self._abandon(holder, ordered, acquisition=acquisition, waiter=waiter,
                                any_scopes=choose is not None)
            raise
        finally:
            if pubsub is not None:
                await self._shielded(_close(pubsub), name=f"semaphore-unsubscribe:{holder}")

    async def _held_choice(
        self, holder: str, fixed: tuple[Scope, ...]
    ) -> tuple[tuple[Scope, ...], str | None] | None:
        """The scopes of `holder`'s lease, and its earlier choice, if it covers `fixed` plus at most one more."""
        stored = await self._stored_scopes(holder)
        if stored is None:
            return None
        names = set(_names(fixed))
        extra = [name for name in stored if name not in names]
        if not names <= set(stored) or len(extra) > 1:
            return None
        # The limit of the earlier choice does not matter any more: a re-entrant grant checks no room.
        return _canonical([*fixed, *(Scope(name, 1) for name in extra)]), (extra[0] if extra else None)

    async def _attempt(
        self,
        holder: str,
        scopes: tuple[Scope, ...],
        meta_json: str,
        *,
        acquisition: str,
        waiter: str,
        choose: Chooser | None = None,
        priority: float | None = None,
    ) -> Lease | None:
        if choose is not None:
            return await self._attempt_choice(holder, scopes, await choose(), meta_json,
                                              acquisition=acquisition, waiter=waiter, priority=priority)
        names = _names(scopes)
        keys = self._acquire_keys(holder, names)
        args: list[str | int] = [
            holder,
            self._lease_ms,
            meta_json,
            acquisition,
            waiter,
            self._waiter_ttl_ms,
            _SCOPE_SEPARATOR.join(names),
            *names,
            *(scope.limit for scope in scopes),
            *_priority_args(priority, scopes, self._keys),
            *(scope.weight for scope in scopes),
        ]
        status, token, expires, held = await self._acquire_script(keys=keys, args=args)
        status = int(status)
        if status == -1:
            raise ValueError(
                f"semaphore {self.name!r}: {holder!r} already holds {_text(held).split(_SCOPE_SEPARATOR)}, "
                f"not {list(names)}"
            )
        if status == 0:
            return None
        lease = Lease(holder=holder, token=int(token), scopes=names, expires_at_ms=int(expires))
        event = {1: "semaphore.acquired", 2: "semaphore.reacquired", 3: "semaphore.readopted"}[status]
        log.debug(event, semaphore=self.name, holder=holder, token=lease.token, scopes=names)
        return lease

    def _acquire_keys(self, holder: str, scope_names: Sequence[str]) -> list[str]:
        """KEYS of both acquire scripts: holders, fence, lease, waiters, scope-name set, then one per scope."""
        return [
            self._keys.holders,
            self._keys.fence,
            self._keys.lease(holder),
            self._keys.waiters,
            self._keys.scopes,
            *(self._keys.scope(name) for name in scope_names),
            self._keys.waiter_priorities,
            self._keys.reservations,
        ]

    async def _attempt_choice(
        self,
        holder: str,
        fixed: tuple[Scope, ...],
        choices: Sequence[Scope],
        meta_json: str,
        *,
        acquisition: str,
        waiter: str,
        priority: float | None = None,
    ) -> Lease | None:
        first: dict[str, Scope] = {}
        for option in choices:  # the caller's order, each scope name once (its first occurrence)
            first.setdefault(option.name, option)
        options = tuple(first.values())
        if not options:
            raise ValueError(f"semaphore {self.name!r}: no choice offered to {holder!r}")
        fixed_names = _names(fixed)
        for option in options:
            if option.name in fixed_names:
                raise ValueError(f"scope {option.name!r} is both fixed and a choice")
        keys = self._acquire_keys(holder, (*fixed_names, *(option.name for option in options)))
        args: list[str | int] = [
            holder, self._lease_ms, meta_json, acquisition, waiter, self._waiter_ttl_ms,
            len(fixed), len(options),
            *fixed_names, *(scope.limit for scope in fixed),
            *(option.name for option in options), *(option.limit for option in options),
            *_priority_args(priority, fixed, self._keys),
            *(scope.weight for scope in fixed), *(option.weight for option in options),
        ]
        status, token, expires, held, chosen = await self._acquire_choice_script(keys=keys, args=args)
        status = int(status)
        if status == -1:
            raise ValueError(f"semaphore {self.name!r}: {holder!r} already holds {_text(held).split(_SCOPE_SEPARATOR)}")
        if status in (0, -2):
            return None
        names = tuple(_text(held).split(_SCOPE_SEPARATOR))
        lease = Lease(holder=holder, token=int(token), scopes=names, expires_at_ms=int(expires),
                      chosen=_text(chosen))
        log.debug("semaphore.acquired", semaphore=self.name, holder=holder, token=lease.token, scopes=names,
                  chosen=lease.chosen)
        return lease

    async def _subscribe(self) -> PubSub:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._keys.released_channel)
            # Until the server confirms, a release could be published before we listen.
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and _text(message.get("type")) == "subscribe":
                    return pubsub
        except BaseException:
            await self._shielded(_close(pubsub), name="semaphore-unsubscribe")
            raise

    async def _wait_for_release(self, pubsub: PubSub, timeout_s: float) -> PubSub:
        try:
            await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        except RedisError as exc:
            # A lost subscription only costs promptness: the bounded poll still finds room.
            log.warning("semaphore.subscription_failed", semaphore=self.name, error=str(exc))
            await self._shielded(_close(pubsub), name="semaphore-unsubscribe")
            await asyncio.sleep(timeout_s)
            return await self._subscribe()
        return pubsub

    async def _abandon(
        self, holder: str, scopes: tuple[Scope, ...], *, acquisition: str, waiter: str,
        any_scopes: bool = False,
    ) -> None:
        # Only a slot granted by this very acquisition is given back: a lease the holder had
        # before (re-entrant call) belongs to whoever acquired it first. With a choice, the
        # granted scopes are only known to Redis: read them back.
        names = _names(scopes)
        if any_scopes:
            names = await self._stored_scopes(holder) or names
        try:
            await self._shielded(
                self._release_raw(holder, names, token=None, acquisition=acquisition, waiter=waiter),
                name=f"semaphore-abandon:{holder}",
            )
        except RedisError as exc:
            # The lease (if any) expires and the reconciler, finding no migration, releases it.
            log.warning("semaphore.abandon_failed", semaphore=self.name, holder=holder, error=str(exc))

    # Lease life cycle -----------------------------------------------------------------------------

    async def renew(self, lease: Lease) -> Lease:
        """Extend ``lease`` by the lease TTL from now (Redis clock).

        Raises :class:`SemaphoreLost` when the holder is gone, carries another token (it was
        adopted or re-granted) or has already expired: the reconciler now decides about it.
        """
        keys = [self._keys.holders, self._keys.lease(lease.holder), *map(self._keys.scope, lease.scopes)]
        status, value = await self._renew_script(keys=keys, args=[lease.holder, lease.token, self._lease_ms])
        status = int(status)
        if status == 1:
            return Lease(lease.holder, lease.token, lease.scopes, int(value), lease.chosen)
        reason = {0: "released", -1: f"now owned by token {int(value)}", -2: "expired"}[status]
        log.warning(
            "semaphore.lost", semaphore=self.name, holder=lease.holder, token=lease.token, reason=reason
        )
        raise SemaphoreLost(
            f"semaphore {self.name!r}: lease of {lease.holder!r} (token {lease.token}) {reason}"
        )

    async def adopt(self, holder: str, *, expected_token: int | None = None) -> Lease:
        """Take over ``holder``'s lease with a new token and a fresh expiry; its slots stay taken.

        Meant for an expired lease whose migration still runs. The new token fences out the
        previous owner. With ``expected_token``, adopt only if the lease still has that token (so a
        reconciler does not take over a lease that was re-granted since it looked). Raises
        :class:`SemaphoreLost` when there is nothing (matching) to adopt.
        """
        for _ in range(_RELEASE_RETRIES):
            scopes = await self._stored_scopes(holder)
            if scopes is None:
                break
            keys = [
                self._keys.holders,
                self._keys.fence,
                self._keys.lease(holder),
                *map(self._keys.scope, scopes),
            ]
            args: list[str | int] = [
                holder,
                self._lease_ms,
                _SCOPE_SEPARATOR.join(scopes),
                "" if expected_token is None else expected_token,
            ]
            status, token, expires = await self._adopt_script(keys=keys, args=args)
            status = int(status)
            if status == 1:
                lease = Lease(holder=holder, token=int(token), scopes=scopes, expires_at_ms=int(expires))
                log.info("semaphore.adopted", semaphore=self.name, holder=holder, token=lease.token)
                return lease
            if status == 0:
                break
            if status == -1:
                raise SemaphoreLost(
                    f"semaphore {self.name!r}: {holder!r} has token {int(token)}, not {expected_token}"
                )
        raise SemaphoreLost(f"semaphore {self.name!r}: {holder!r} holds no lease to adopt")

    async def release(self, holder: str, *, token: int | None = None) -> bool:
        """Free ``holder``'s slots; with ``token``, only if the lease still carries that token.

        Returns whether a lease was released. The work runs in a shielded task, so it completes even
        if the caller is cancelled meanwhile. Releasing publishes a wake-up for waiters.
        """
        return await self._shielded(self._release(holder, token=token), name=f"semaphore-release:{holder}")

    async def _release(self, holder: str, *, token: int | None) -> bool:
        for _ in range(_RELEASE_RETRIES):
            scopes = await self._stored_scopes(holder)
            if scopes is None:
                return False
            status = await self._release_raw(holder, scopes, token=token, acquisition=None, waiter="")
            if status >= 0:
                return status == 1
        return False

    async def _release_raw(
        self,
        holder: str,
        scopes: tuple[str, ...],
        *,
        token: int | None,
        acquisition: str | None,
        waiter: str,
    ) -> int:
        keys = [
            self._keys.holders,
            self._keys.lease(holder),
            self._keys.scopes,
            self._keys.waiters,
            *map(self._keys.scope, scopes),
            self._keys.waiter_priorities,
            self._keys.reservations,
        ]
        args: list[str | int] = [
            holder,
            "" if token is None else token,
            acquisition or "",
            _SCOPE_SEPARATOR.join(scopes),
            waiter,
            self._keys.released_channel,
            *scopes,
        ]
        status = int(await self._release_script(keys=keys, args=args))
        if status == 1:
            log.debug("semaphore.released", semaphore=self.name, holder=holder, token=token)
        return status

    async def _stored_scopes(self, holder: str) -> tuple[str, ...] | None:
        raw = await self._redis.hget(self._keys.lease(holder), "scopes")  # type: ignore[misc]
        if raw is None:
            return None
        return tuple(_text(raw).split(_SCOPE_SEPARATOR))

    # Inspection -----------------------------------------------------------------------------------

    async def holders(self) -> list[HolderInfo]:
        """Every lease, live or expired, ordered by expiry (soonest first)."""
        seconds, micros = await self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        members = await self._redis.zrange(self._keys.holders, 0, -1)
        if not members:
            return []
        holders = [_text(member) for member in members]
        async with self._redis.pipeline(transaction=False) as pipe:
            for holder in holders:
                pipe.hgetall(self._keys.lease(holder))
            records = await pipe.execute()
        infos: list[HolderInfo] = []
        for holder, record in zip(holders, records, strict=True):
            if not record:
                continue  # released between the two reads
            fields = {_text(k): _text(v) for k, v in record.items()}
            expires = int(fields["expires_at_ms"])
            infos.append(
                HolderInfo(
                    holder=holder,
                    token=int(fields["token"]),
                    scopes=tuple(fields["scopes"].split(_SCOPE_SEPARATOR)),
                    expires_at_ms=expires,
                    expired=expires <= now_ms,
                    acquired_at_ms=int(fields["acquired_at_ms"]),
                    meta=MappingProxyType(json.loads(fields["meta"])),
                )
            )
        return infos

    async def expired(self) -> list[HolderInfo]:
        """Leases past their expiry that still occupy their slots, awaiting the reconciler."""
        return [info for info in await self.holders() if info.expired]

    async def waiters(self) -> int:
        """How many acquirers are waiting now (dead ones drop out after missing heartbeats)."""
        return int(await self._waiters_script(keys=[self._keys.waiters], args=[]))

    async def usage(self) -> dict[str, int]:
        """Holders per scope that has any (expired leases included), plus ``"waiters"``."""
        names = sorted(_text(name) for name in await self._redis.smembers(self._keys.scopes))  # type: ignore[misc]
        counts: dict[str, int] = {}
        if names:
            async with self._redis.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.zcard(self._keys.scope(name))
                results = await pipe.execute()
            counts = {name: int(count) for name, count in zip(names, results, strict=True) if int(count) > 0}
        counts[WAITERS_KEY] = await self.waiters()
        return counts

    # Plumbing -------------------------------------------------------------------------------------

    async def _shielded(self, coro: Coroutine[Any, Any, _T], *, name: str) -> _T:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        # Nobody may be left to await a task whose caller was cancelled; report its failure here.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning(
                "semaphore.cleanup_failed", semaphore=self.name, task=task.get_name(), error=repr(exc)
            )


def _priority_args(priority: float | None, scopes: Sequence[Scope], keys: SemaphoreKeys) -> tuple[str, str]:
    """The two ARGV of a priority: the number and the waiter's entry (number, then scope key/limit pairs, each
    limit less the scope's weight plus one: "holders < limit" is room for the weight)."""
    if priority is None:
        return "", ""
    number = repr(float(priority))
    pairs = (f"{keys.scope(scope.name)}{_SCOPE_SEPARATOR}{scope.limit - scope.weight + 1}" for scope in scopes)
    return number, _SCOPE_SEPARATOR.join([number, *pairs])


def _names(scopes: tuple[Scope, ...]) -> tuple[str, ...]:
    return tuple(scope.name for scope in scopes)


async def _close(pubsub: PubSub) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated


class HeldSlot:
    """A lease held by :func:`hold`: renewed in the background until the block ends.

    ``lost`` is set when renewal fails for good (the lease expired, was adopted or released, or
    Redis stayed unreachable for a whole TTL). From then on the caller must stop touching what the
    slot protects; the slot is not released, the reconciler decides about it.
    """

    def __init__(self, semaphore: RedisSemaphore, lease: Lease) -> None:
        self._semaphore = semaphore
        self._lease = lease
        self._kept = False
        self.lost = asyncio.Event()

    @property
    def lease(self) -> Lease:
        """The lease as of its last renewal (the token never changes)."""
        return self._lease

    @property
    def kept(self) -> bool:
        """Whether :meth:`keep` was called."""
        return self._kept

    def keep(self) -> None:
        """Leave the slot held after the block (for example, the migration is still running).

        Renewal stops with the block, so the lease expires and the reconciler adopts or releases it.
        """
        self._kept = True

    async def confirm(self) -> Lease:
        """Renew now; call right before acting on what the slot protects.

        Raises :class:`SemaphoreLost` (and sets ``lost``) when the lease is no longer ours.
        """
        if self.lost.is_set():
            raise SemaphoreLost(f"lease of {self._lease.holder!r} (token {self._lease.token}) was lost")
        try:
            self._lease = await self._semaphore.renew(self._lease)
        except SemaphoreLost:
            self.lost.set()
            raise
        return self._lease

    async def _renew_forever(self, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        # The Redis expiry is only known as of the last successful renewal; past a whole TTL
        # without one, the lease has certainly expired on the Redis clock too.
        last_ok = loop.time()
        while True:
            await asyncio.sleep(every_s)
            try:
                self._lease = await self._semaphore.renew(self._lease)
                last_ok = loop.time()
            except SemaphoreLost:
                self.lost.set()
                return
            except RedisError as exc:
                if loop.time() - last_ok >= self._semaphore.lease_ttl_s:
                    log.warning("semaphore.lost", holder=self._lease.holder, reason="redis unreachable")
                    self.lost.set()
                    return
                log.warning("semaphore.renew_failed", holder=self._lease.holder, error=str(exc))


@contextlib.asynccontextmanager
async def hold(
    semaphore: RedisSemaphore,
    holder: str,
    scopes: Sequence[Scope],
    *,
    meta: Mapping[str, str] | None = None,
    renew_every_s: float | None = None,
    timeout_s: float | None = None,
    on_wait: Callable[[], Awaitable[None]] | None = None,
    choose: Chooser | None = None,
    priority: float | None = None,
) -> AsyncIterator[HeldSlot]:
    """Acquire, renew every ``renew_every_s`` (default: a third of the lease TTL), release on exit.

    The release survives cancellation of the block. It is skipped when the slot was lost (it is no
    longer ours to free) or kept (see :meth:`HeldSlot.keep`).
    """
    lease = await semaphore.acquire(holder, scopes, meta=meta, timeout_s=timeout_s, on_wait=on_wait,
                                    choose=choose, priority=priority)
    slot = HeldSlot(semaphore, lease)
    every_s = semaphore.lease_ttl_s / 3 if renew_every_s is None else renew_every_s
    renewer = asyncio.create_task(slot._renew_forever(every_s), name=f"semaphore-renew:{holder}")
    try:
        yield slot
    finally:
        renewer.cancel()
        try:
            if not slot.kept and not slot.lost.is_set():
                try:
                    await semaphore.release(holder, token=lease.token)
                except RedisError as exc:
                    # The lease expires; the reconciler finds the migration final and releases it.
                    log.warning("semaphore.release_failed", holder=holder, error=str(exc))
        finally:
            # The renewer is already cancelled; waiting only reaps it. A renewal racing the release
            # finds the lease gone and changes nothing.
            await asyncio.wait([renewer])
