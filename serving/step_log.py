"""A log of the served engine's steps, timed as the serving loop runs them (`--step-log PATH`).

The planner's profile (`python -m dsjax.plan profile`) times the model runner alone. A served step
costs more: the engine loop's bookkeeping, handing tokens to the gRPC handler threads, admitting
requests and landing pulled KV between steps, and every other Python thread of the process taking
the GIL meanwhile. To model that, every busy iteration of an `EngineLoop` is timed from the start
of `step()` to the end of the command drain and timers that follow it (the point where the loop
would start its next step), and written with the shapes of the program calls the step made:

    {"t": 1763821234.512,          # wall-clock start of the step (time.time())
     "ms": 4.81,                   # served step time
     "backend": "xla",             # the attention path the programs took: "xla" or "pallas"
     "calls": [{"kind": "decode",  "ctx": [212, 97, 130]},          # context length per request
               {"kind": "prefill", "chunks": [[0, 180], [0, 33]]}]} # [start, end) per chunk

One JSON object per line. A step whose program calls include a first compilation shows up as a
slow outlier; the fitter (dsjax/planner/served.py) takes medians per padded shape. Records are
buffered and written every `flush_every` steps or `flush_seconds`, and on close.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Sequence


class StepLog:
    """Collects program calls (`note_*`, from the runner's launch hook) and closes them into one
    record per served step (`end_step`). Used from the engine loop's thread only."""

    def __init__(self, path: str | Path, *, backend: str | None = None, flush_every: int = 256,
                 flush_seconds: float = 1.0):
        self.path = Path(path)
        self.backend = backend  # the served runners' attention path (ModelRunner.attention_backend)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._calls: list[dict[str, Any]] = []
        self._lines: list[str] = []
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # close() may come from another thread
        self.num_steps = 0

    # runner launch hook: (kind, per-request shapes)
    def note(self, kind: str, shapes: Sequence) -> None:
        if kind == "decode":
            self._calls.append({"kind": "decode", "ctx": [int(c) for c in shapes]})
        elif kind == "prefill":
            self._calls.append({"kind": "prefill", "chunks": [[int(s), int(e)] for s, e in shapes]})
        else:
            raise ValueError(f"kind={kind!r} must be 'prefill' or 'decode'")

    def end_step(self, start_wall: float, seconds: float) -> None:
        """Close the step that started at `start_wall` and took `seconds` (no-op without calls)."""
        if not self._calls:
            return
        record: dict[str, Any] = {"t": round(start_wall, 6), "ms": round(seconds * 1e3, 4)}
        if self.backend is not None:
            record["backend"] = self.backend
        record["calls"] = self._calls
        self._lines.append(json.dumps(record, separators=(",", ":")))
        self._calls = []
        self.num_steps += 1
        if len(self._lines) >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._lines and not self._file.closed:
                self._file.write("\n".join(self._lines) + "\n")
                self._file.flush()
            self._lines = []
            self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._file.close()


class StepTimer:
    """The engine loop's side: `start()` before `step()`, `stop()` after the drain that follows."""

    def __init__(self, log: StepLog):
        self.log = log
        self._t0: float | None = None
        self._wall = 0.0

    def start(self) -> None:
        self._t0, self._wall = time.perf_counter(), time.time()

    def stop(self) -> None:
        if self._t0 is not None:
            self.log.end_step(self._wall, time.perf_counter() - self._t0)
            self._t0 = None


def read_step_log(path: str | Path, *, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """The records of a step log, optionally only those that started in [since, until)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from e
            t = float(rec["t"])
            if (since is None or t >= since) and (until is None or t < until):
                out.append(rec)
    return out
