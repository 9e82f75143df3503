"""A clock that only moves when slept on: times emulated devices exactly, without waiting."""

from __future__ import annotations

import threading


class ManualClock:
    def __init__(self, start: float = 100.0):
        self.now = start
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
