"""A decode instance's running requests, with their reserved KV kept as a running sum.

`DecodeInstance.load()` (the KV tokens its requests reserve at their peak, prompt + max_tokens
each) is read for every decode instance each time a prefilled request is placed (the
least-loaded rule the simulator shares). As a sum over every running request it cost
O(instances x running) per placed request: 11% of the interpreter time of a one-process server
with 16 instances at 70 req/s of OPT-13B ShareGPT (docs/results.md, "Session 18"). This list keeps
the sum as requests come and go, so the read is O(1).

Invariant: `peak_tokens == sum(r.peak_tokens for r in self)`. The mutations the engines and
workers use (append, remove, pop; insert too) adjust it by the request's own peak, which does not change while
it runs (its prompt changes only when it is recomputed, after it has left); any other mutation
recounts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import SupportsIndex

from dsjax.engine.request import Request


class RunningRequests(list):
    def __init__(self, reqs: Iterable[Request] = ()):
        super().__init__(reqs)
        self._recount()

    def _recount(self) -> None:
        self.peak_tokens = sum(r.peak_tokens for r in self)

    def append(self, req: Request) -> None:
        super().append(req)
        self.peak_tokens += req.peak_tokens

    def remove(self, req: Request) -> None:
        super().remove(req)
        self.peak_tokens -= req.peak_tokens

    def pop(self, index: SupportsIndex = -1) -> Request:
        req = super().pop(index)
        self.peak_tokens -= req.peak_tokens
        return req

    # insert adds its request's peak too; every other mutation recounts (none is on a hot path).
    def extend(self, reqs: Iterable[Request]) -> None:
        super().extend(reqs)
        self._recount()

    def insert(self, index: SupportsIndex, req: Request) -> None:
        super().insert(index, req)
        self.peak_tokens += req.peak_tokens

    def clear(self) -> None:
        super().clear()
        self.peak_tokens = 0

    def __iadd__(self, reqs: Iterable[Request]):  # type: ignore[override]
        super().__iadd__(reqs)
        self._recount()
        return self

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, value)
        self._recount()

    def __delitem__(self, index) -> None:
        super().__delitem__(index)
        self._recount()
