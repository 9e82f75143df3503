"""Python's cyclic garbage collector: kept quiet while serving, and its pauses counted.

CPython frees most objects by reference counting; a separate collector finds cycles, and while it
runs the whole process stops (every engine loop, the router, the gRPC threads). A young
collection (generation 0 or 1) traverses the objects allocated since the last one; a full
collection (generation 2) traverses every tracked object of the heap: the imports, the
configuration, the plan, the compiled programs' Python side, everything start-up left behind. In
the emulated 32-device server of OPT-66B HumanEval (docs/results.md, session 20) full collections
stopped the process for up to 79 ms, young ones for up to 29 ms, against a 125-ms TTFT SLO: every
request in flight during such a pause misses it, which is how a server at its knee falls a few
points below what its scheduler can do.

`quiet_gc()` does two things once start-up and warm-up are over:

- **freeze** (Instagram's `gc.freeze`, CPython 3.7+): collect once and move every object alive
  into the permanent generation, which no collection traverses again; a full collection then costs
  what the serving heap costs (requests in flight, their streams), not what the process built to
  get there. In that server the longest full-collection pause went from 79 to 41 ms.
- **a larger young generation** (`young_threshold`, CPython's default 700): a serving process
  allocates thousands of short-lived containers a step (token events, stream messages, asyncio
  futures and coroutines), and the cyclic ones among them (a coroutine and its frame, an
  exception and its traceback) wait for a collection whose cost is mostly freeing them. Frozen,
  with 700, the server above collected 515 times in a 95-s run, 1,060 ms in all, 58 pauses of 5 ms
  or more; with 20,000, 12 times, 164 ms, 5 such pauses (the longest young one 43 ms against 19:
  fewer, longer pauses, a sixth of the stopped time).

The collector stays on: cycles created while serving are still found.

`GCPauses` times every collection (`gc.callbacks`): count, total and longest pause per
generation, for the Prometheus endpoint (`dsjax_gc_*`), the server's exit log and the benchmark.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

GENERATIONS = (0, 1, 2)
YOUNG_THRESHOLD = 20_000  # collections of generation 0 after this many net allocations (CPython: 700)
_PROCESS: "GCPauses | None" = None  # process_pauses()


def quiet_gc(*, freeze: bool = True, young_threshold: int | None = YOUNG_THRESHOLD) -> int:
    """After start-up: one full collection, then (with `freeze`) every surviving object moved to
    the permanent generation, and (with `young_threshold`) young collections that rare; None or 0
    keeps the interpreter's thresholds. Returns the number of objects frozen (0 without `freeze`)."""
    if young_threshold is not None and young_threshold < 0:
        raise ValueError(f"young_threshold={young_threshold} must be >= 0 (0 keeps the interpreter's)")
    gc.collect()
    if young_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(int(young_threshold), older, oldest)
    if not freeze:
        return 0
    gc.freeze()
    return gc.get_freeze_count()


def restore_gc(thresholds: tuple[int, int, int]) -> None:
    """Undo `quiet_gc` (a library caller's process gets its collector back as it was): frozen
    objects back into the oldest generation, the thresholds `gc.get_threshold()` gave before."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def serving_ready(*, freeze: bool, young_threshold: int | None, log: logging.Logger) -> None:
    """Start-up and warm-up are over: `quiet_gc`, said in the log."""
    frozen = quiet_gc(freeze=freeze, young_threshold=young_threshold)
    log.info("garbage collector: %d start-up objects frozen (--no-gc-freeze keeps them collectable), thresholds %s "
             "(--gc-young-threshold)", frozen, gc.get_threshold())


def log_pauses(log: logging.Logger) -> None:
    """The process's pauses since `process_pauses()` was first called, as one log line."""
    if _PROCESS is not None:
        log.info("garbage-collection pauses while up: %s", _PROCESS.summary_line())


def process_pauses() -> "GCPauses":
    """This process's monitor (one a process), installed on the first call."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = GCPauses().install()
    return _PROCESS


class GCPauses:
    """Times every collection of this process from `install()` to `uninstall()`. Thread-safe to
    read: the collector runs its callbacks with the interpreter stopped, so updates are whole."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started: float | None = None
        self.count = dict.fromkeys(GENERATIONS, 0)
        self.total_s = dict.fromkeys(GENERATIONS, 0.0)
        self.max_s = dict.fromkeys(GENERATIONS, 0.0)
        self.over_5ms = dict.fromkeys(GENERATIONS, 0)  # pauses of 5 ms or more (a TTFT SLO notices those)

    def install(self) -> GCPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed mid-collection
            return
        pause, self._started = time.perf_counter() - self._started, None
        g = int(info.get("generation", 2))
        with self._lock:
            self.count[g] += 1
            self.total_s[g] += pause
            self.max_s[g] = max(self.max_s[g], pause)
            self.over_5ms[g] += pause >= 0.005

    def snapshot(self) -> dict[str, Any]:
        """{"gen0": {"collections", "pause_total_ms", "pause_max_ms", "pauses_over_5ms"}, ...}."""
        with self._lock:
            return {f"gen{g}": {"collections": self.count[g], "pause_total_ms": round(1e3 * self.total_s[g], 3),
                                "pause_max_ms": round(1e3 * self.max_s[g], 3), "pauses_over_5ms": self.over_5ms[g]}
                    for g in GENERATIONS}

    # (not `describe`: a Prometheus registry calls a collector's describe() for its metrics)
    def summary_line(self) -> str:
        """One line for a log: per generation, collections / total / longest pause."""
        return "; ".join(f"{k}: {v['collections']} collections, {v['pause_total_ms']:.1f} ms in all, longest "
                         f"{v['pause_max_ms']:.1f} ms" for k, v in self.snapshot().items())

    def collect(self) -> Iterator:
        """The Prometheus collector protocol (`registry.register(pauses)`)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        count = CounterMetricFamily("dsjax_gc_collections", "Garbage collections of the router process",
                                    labels=["generation"])
        total = CounterMetricFamily("dsjax_gc_pause_seconds", "Time the router process stood still collecting garbage",
                                    labels=["generation"])
        longest = GaugeMetricFamily("dsjax_gc_pause_max_seconds", "Longest garbage-collection pause since start",
                                    labels=["generation"])
        with self._lock:
            for g in GENERATIONS:
                count.add_metric([str(g)], self.count[g])
                total.add_metric([str(g)], self.total_s[g])
                longest.add_metric([str(g)], self.max_s[g])
        yield from (count, total, longest)
