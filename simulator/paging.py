"""List paging (`limit` and `continue`) as kube-apiserver serves it from etcd.

What it promises, like the real API server (apiserver's storage/etcd3 `List` and `meta.k8s.io` continue
tokens):
- a list with `limit=N` returns at most N items in key order (namespace/name) and, when more remain,
  `metadata.continue` (an opaque base64 token naming the list's resourceVersion and the key to start after) and
  `metadata.remainingItemCount` when the list has no selectors;
- every page of one list is read at the first page's resourceVersion, so objects created, changed or deleted
  between pages do not show up (a consistent snapshot; the store never mutates committed objects in place, so
  a snapshot is a list of references);
- a token whose resourceVersion is older than the store's history (etcd's compaction) answers 410 Expired; a
  token that does not decode answers 400; `resourceVersion` together with `continue` answers 400.

It keeps at most `capacity` snapshots (least recently used dropped first); a token whose snapshot was dropped
is answered like a compacted one (410), which clients handle by listing again.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from simulator.errors import ApiError

Obj = dict[str, Any]
_TOKEN_VERSION = "meta.k8s.io/v1"
EXPIRED_MESSAGE = ("The provided continue parameter is too old to display a consistent list result. You can start a "
                   "new list without the continue parameter.")


def _key(obj: Obj) -> tuple[str, str]:
    """The store's sort key (namespace, name); etcd's key order within one resource is the same."""
    meta = obj["metadata"]
    return (meta.get("namespace") or "", str(meta["name"]))


def _key_text(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def _key_of_text(text: str) -> tuple[str, str]:
    namespace, _, name = text.rpartition("/")
    return (namespace, name)


def encode_continue(rv: int, start_after: str) -> str:
    """The token: the list's resourceVersion and the key the next page starts after (etcd's key + "\\x00")."""
    body = json.dumps({"v": _TOKEN_VERSION, "rv": rv, "start": f"{start_after}\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    """(resourceVersion, key to start after) of a token; 400 when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != _TOKEN_VERSION:
            raise ValueError("unknown version")
        rv, start = data["rv"], data["start"]
        if not isinstance(rv, int) or not isinstance(start, str) or not start.endswith("\x00"):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ApiError.bad_request(f"continue key is not valid: {exc}") from exc
    return rv, start[:-1]


@dataclass(frozen=True)
class Page:
    items: list[Obj]
    resource_version: int
    continue_token: str | None
    remaining: int | None


class Pager:
    """Snapshots of paged lists, keyed by what was listed and at which resourceVersion."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._snapshots: OrderedDict[tuple[Any, ...], tuple[list[Obj], list[tuple[str, str]]]] = OrderedDict()

    def page(self, scope: tuple[Any, ...], *, items: list[Obj] | None, rv: int, limit: int | None,
             token: str | None, oldest_rv: int, filtered: bool) -> Page:
        """One page. `items` is the current list (sorted by key) at `rv` for a first page; for a continued one
        it is unused and the snapshot of the token's resourceVersion is served."""
        if token is not None:
            token_rv, start_after = decode_continue(token)
            cached = self._snapshots.get((*scope, token_rv))
            if token_rv < oldest_rv or cached is None:
                raise ApiError.gone(EXPIRED_MESSAGE)
            self._snapshots.move_to_end((*scope, token_rv))
            snapshot, keys = cached
            start = bisect.bisect_right(keys, _key_of_text(start_after))
            rv = token_rv
        else:
            assert items is not None
            snapshot, keys, start = items, [], 0
        if limit is None or limit <= 0 or len(snapshot) - start <= limit:
            return Page(snapshot[start:], rv, None, None)
        end = start + limit
        if not keys:
            keys = [_key(o) for o in snapshot]
            self._snapshots[(*scope, rv)] = (snapshot, keys)
            self._snapshots.move_to_end((*scope, rv))
            while len(self._snapshots) > self.capacity:
                self._snapshots.popitem(last=False)
        remaining = None if filtered else len(snapshot) - end
        return Page(snapshot[start:end], rv, encode_continue(rv, _key_text(keys[end - 1])), remaining)
