"""Bookkeeping of a continuous-batching decode batch, advanced many steps at a time.

Every decode step each running request gains one token and its context grows by one, so while the
batch's membership is fixed, sum(ctx + 1) grows by B per step and the step time grows linearly:

    step_j = alpha + beta * j              (j = 0, 1, ... steps since the segment started)
    T(k)   = k * alpha + beta * k (k - 1) / 2   (time for k steps)

Membership changes only at step boundaries (a request finishes, or a waiting one joins), so the
simulator needs one event per membership change instead of one per token: it asks for the next
boundary (`steps_to_next_boundary`: the next finish), or for the first boundary at or after some
time (`steps_until`) when a newcomer wants in, and then `advance`s that many steps. With the
engine's shape buckets (padded or dense attention) a step costs the padded context width of the
longest request instead, constant until that request outgrows the width: one more boundary.

Worked example: two requests with prompts 100 and 300 join at step 0 with 3 and 1 steps to go.
sum(ctx + 1) = 101 + 301 = 402 for step 0, 404 for step 1; after `advance(1)` the second request
finishes (its next term would have been 302) and sum(ctx + 1) = 404 - 302 = 102 for the next step.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsjax.planner.latency import LatencyModel

_MIN_STEP_S = 1e-6


class RunningBatch:
    """Running decode requests of one instance (request ids are ints)."""

    __slots__ = ("latency", "step_overhead_s", "heap", "base", "steps_done", "sum_ctx", "t0", "alpha", "beta", "track_max", "max_base", "reshape_in")

    def __init__(self, latency: LatencyModel, step_overhead_s: float = 0.0) -> None:
        self.latency = latency
        self.step_overhead_s = step_overhead_s  # host time added to every step (SimConfig.decode_host_s)
        self.heap: list[tuple[int, int]] = []  # (step count at which it finishes, request id)
        self.base: dict[int, int] = {}  # rid -> ctx+1 at step j is base + j
        self.steps_done = 0  # decode steps completed by this instance so far
        self.sum_ctx = 0  # sum(ctx + 1) of the running requests for the next step
        self.t0 = 0.0  # start time of the current segment
        self.alpha = 0.0
        self.beta = 0.0
        self.track_max = latency.needs_max_context
        self.max_base = 0  # max(base) when track_max: the longest ctx+1 is max_base + steps_done
        self.reshape_in: int | None = None  # steps of the segment until the padded width changes

    def __len__(self) -> int:
        return len(self.heap)

    def join(self, rid: int, *, context_len: int, steps: int) -> None:
        """Add a request whose KV already holds `context_len` tokens and that needs `steps` more
        decode steps (output_len - 1 after a prefill produced the first token)."""
        if steps < 1:
            raise ValueError(f"request {rid} joins with steps={steps}; it must need >= 1 decode step")
        heapq.heappush(self.heap, (self.steps_done + steps, rid))
        base = context_len + 1 - self.steps_done
        self.base[rid] = base
        self.sum_ctx += context_len + 1
        if self.track_max and (len(self.base) == 1 or base > self.max_base):
            self.max_base = base

    @property
    def longest(self) -> int | None:
        """The longest ctx + 1 of the next step (None unless the latency model needs it)."""
        return self.max_base + self.steps_done if self.track_max and self.heap else None

    def start_segment(self, t: float) -> None:
        """Freeze membership from time `t` (a step boundary) and precompute the step-time line."""
        self.t0 = t
        longest = self.max_base + self.steps_done if self.track_max else None
        alpha, beta = self.latency.decode_linear_s(len(self.heap), self.sum_ctx, longest)
        alpha += self.step_overhead_s
        self.alpha = alpha if alpha > _MIN_STEP_S else _MIN_STEP_S
        self.beta = beta if beta > 0.0 else 0.0
        self.reshape_in = self.latency.decode_steps_to_reshape(longest) if self.track_max else None

    def steps_to_next_boundary(self) -> int:
        """Steps to the next finish, or to the next change of the padded width if sooner."""
        k = self.heap[0][0] - self.steps_done
        return k if self.reshape_in is None or self.reshape_in >= k else self.reshape_in

    def time_after(self, k: int) -> float:
        """Time of the boundary after k steps of the current segment."""
        return self.t0 + k * self.alpha + self.beta * (k * (k - 1) * 0.5)

    def steps_until(self, t: float) -> int:
        """Smallest k >= 1 whose boundary is at or after time t."""
        delta = t - self.t0
        if delta <= self.alpha:
            return 1
        a, b = self.alpha, self.beta
        if b <= 0.0:
            k = math.ceil(delta / a)
        else:
            h = a - 0.5 * b
            k = math.ceil((-h + math.sqrt(h * h + 2.0 * b * delta)) / b)
        k = max(k, 1)
        while k > 1 and self.time_after(k - 1) >= t:
            k -= 1
        while self.time_after(k) < t:
            k += 1
        return k

    @property
    def kv_tokens(self) -> int:
        """KV tokens the running requests hold before the next step writes one more each."""
        return self.sum_ctx - len(self.heap)

    def kv_at(self, t: float) -> int:
        """KV tokens held at time t within the current segment, the in-flight step's included (an
        engine grows a request's blocks when it launches the step)."""
        return self.sum_ctx + len(self.heap) * (self.steps_until(t) - 1)

    def steps_that_fit(self, room_tokens: int) -> int:
        """Steps of the current segment whose KV fits in `room_tokens` (those the running requests
        hold included): step j needs sum_ctx + B j."""
        n = len(self.heap)
        return (room_tokens - self.sum_ctx) // n + 1 if n else 1 << 30

    def newest(self) -> int:
        """The request that joined last (the engine preempts from that end)."""
        return next(reversed(self.base))

    def remove(self, rid: int) -> int:
        """Take a request out between steps (preempted); returns the KV tokens it held."""
        ctx_plus_1 = self.base.pop(rid) + self.steps_done
        self.heap = [e for e in self.heap if e[1] != rid]
        heapq.heapify(self.heap)
        self.sum_ctx -= ctx_plus_1
        if self.track_max:
            self.max_base = max(self.base.values(), default=0)
        return ctx_plus_1 - 1

    def advance(self, k: int) -> list[int]:
        """Run k steps; return the ids of requests that produced their last token."""
        self.steps_done += k
        self.sum_ctx += k * len(self.heap)
        finished: list[int] = []
        heap = self.heap
        while heap and heap[0][0] <= self.steps_done:
            _, rid = heapq.heappop(heap)
            self.sum_ctx -= self.base.pop(rid) + self.steps_done
            finished.append(rid)
        if self.track_max and finished:
            self.max_base = max(self.base.values(), default=0)
        return finished
