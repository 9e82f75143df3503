"""Leases on KV held for transfer (plain Python; the prefill worker's engine thread owns one).

A prefilled request's KV stays in the prefill pool until the decode side has pulled and inserted
it and says so (release). If nobody does within the lease (the router or the decode worker died,
or a message was lost), the lease expires and the blocks are freed: KV is never held forever.
Pulling, and the decode side's periodic renewals while the request waits there for room, extend
the lease; a pull in progress never races a free because both run on the engine thread.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class Lease(Generic[T]):
    item: T
    deadline: float
    limit: float  # no renewal goes past it


class LeaseTable(Generic[T]):
    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic, max_hold_s: float | None = None):
        """`max_hold_s`: how long renewals may keep one lease alive (default 20 x lease_s)."""
        if lease_s <= 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        self.lease_s = lease_s
        self.max_hold_s = 20 * lease_s if max_hold_s is None else max_hold_s
        if self.max_hold_s < lease_s:
            raise ValueError(f"max_hold_s={self.max_hold_s} must be >= lease_s={lease_s}")
        self._clock = clock
        self._leases: dict[str, Lease[T]] = {}
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, key: str) -> bool:
        return key in self._leases

    def hold(self, key: str, item: T) -> None:
        if key in self._leases:
            raise ValueError(f"a lease on {key!r} is already held")
        now = self._clock()
        self._leases[key] = Lease(item, now + self.lease_s, now + self.max_hold_s)

    def get(self, key: str) -> T | None:
        lease = self._leases.get(key)
        return None if lease is None else lease.item

    def renew(self, key: str) -> bool:
        """Extend the lease by lease_s from now, up to its limit; False if none is held (or it
        is past its limit: it expires at the next `pop_expired`)."""
        lease = self._leases.get(key)
        now = self._clock()
        if lease is None or now >= lease.limit:
            return False
        lease.deadline = min(now + self.lease_s, lease.limit)
        return True

    def pop(self, key: str) -> T | None:
        lease = self._leases.pop(key, None)
        return None if lease is None else lease.item

    def pop_expired(self) -> list[tuple[str, T]]:
        now = self._clock()
        gone = [k for k, lease in self._leases.items() if lease.deadline <= now]
        self.num_expired += len(gone)
        return [(k, self._leases.pop(k).item) for k in gone]
