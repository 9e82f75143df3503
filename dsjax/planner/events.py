"""The discrete-event core: a heapq of timed callbacks and a table of per-request times."""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable

import numpy as np

from dsjax.workloads.trace_gen import Trace


class EventLoop:
    """Callbacks `fn(t, arg)` run in time order; ties run in scheduling order (FIFO)."""

    __slots__ = ("heap", "seq", "now", "num_events")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self.seq = 0
        self.now = 0.0
        self.num_events = 0

    def at(self, t: float, fn: Callable[[float, Any], None], arg: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def run(self) -> None:
        heap = self.heap
        pop = heapq.heappop
        n = 0
        while heap:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(t, arg)
            n += 1
        self.num_events += n


class RequestTable:
    """Lengths and outcome times of every request, as plain lists (fast scalar access)."""

    __slots__ = ("arrival", "prompt", "output", "need", "done", "plen", "first", "finish")

    def __init__(self, trace: Trace) -> None:
        self.arrival: list[float] = trace.arrival_s.tolist()
        self.prompt: list[int] = trace.prompt_len.tolist()
        self.output: list[int] = trace.output_len.tolist()
        self.need: list[int] = [p + o for p, o in zip(self.prompt, self.output)]  # peak KV tokens
        # A request preempted for lack of KV memory is prefilled again over everything it holds
        # (the engine's recompute): `done` = output tokens it had, `plen` = prompt + done, the
        # length its next prefill runs over (the prompt until then).
        self.done: list[int] = [0] * len(self.prompt)
        self.plen: list[int] = list(self.prompt)
        n = len(self.arrival)
        self.first: list[float] = [math.inf] * n
        self.finish: list[float] = [math.inf] * n

    def __len__(self) -> int:
        return len(self.arrival)

    def preempted(self, rid: int, context: int) -> None:
        """A running request holding `context` KV tokens lost them: its next prefill runs over all
        of them and the last sampled token, whose KV was not written yet."""
        self.done[rid] = context - self.prompt[rid] + 1
        self.plen[rid] = context + 1

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "arrival_s": np.array(self.arrival),
            "first_token_s": np.array(self.first),
            "finish_s": np.array(self.finish),
            "output_len": np.array(self.output),
        }
