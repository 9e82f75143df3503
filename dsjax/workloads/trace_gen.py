"""Request traces: when requests arrive and how long their prompts and outputs are.

The one trace implementation of the project (the planner's simulator reads it too). A trace is
stored as JSON Lines, one request a line, keys in this order:

    {"arrival_s": 0.731, "prompt_len": 412, "output_len": 87}

In memory a `Trace` holds three numpy arrays sorted by arrival (what the simulator wants) and is
also a sequence of `TraceEntry` (what a benchmark client iterates over).

Arrivals (`arrival_times`): the first request at `start_s`, then i.i.d. gaps with mean 1/rate.
"poisson" draws exponential gaps; "gamma" draws gamma gaps with shape 1/cv**2 and scale
cv**2/rate, so the gaps' coefficient of variation is `cv` (cv > 1 is burstier than Poisson, cv = 1
is Poisson, cv < 1 is smoother). Seeded with `numpy.random.default_rng(seed)`.

Lengths come from a list of (prompt_len, output_len) pairs (`make_trace`, e.g. a real workload
from `load_workload`) or from a pluggable `LengthSampler` (`generate_trace`; anything with
`sample(rng, n) -> (prompt_lens, output_lens)`). Every trace is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, overload

import numpy as np

ARRIVAL_PROCESSES: tuple[str, ...] = ("poisson", "gamma")
ARRIVALS = ARRIVAL_PROCESSES  # the planner's name for it


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceConfig:
    rate: float  # requests per second
    arrival: str = "poisson"
    cv: float = 1.0  # gaps' coefficient of variation; only for "gamma"
    seed: int = 0
    start_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"{self.rate=} must be a finite rate > 0 (requests per second)")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"{self.arrival=} must be one of {ARRIVAL_PROCESSES}")
        if not (math.isfinite(self.cv) and self.cv > 0):
            raise ValueError(f"{self.cv=} must be finite and > 0")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError(f"{self.cv=} is only for arrival='gamma'; Poisson gaps have cv 1")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"{self.start_s=} must be finite and >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceEntry:
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"{self.arrival_s=} must be finite and >= 0")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.prompt_len=} and {self.output_len=} must both be >= 1")

    def to_json(self) -> str:
        return json.dumps({"arrival_s": self.arrival_s, "prompt_len": self.prompt_len, "output_len": self.output_len})


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Trace(Sequence[TraceEntry]):
    """Requests sorted by arrival. Arrays: arrival_s float64 [N], prompt_len int64 [N], output_len int64 [N].

    Indexing with an int gives a `TraceEntry`, with a slice a `Trace`; two traces are equal when
    their arrays are (exactly).
    """

    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray

    def __post_init__(self) -> None:
        arrival = np.asarray(self.arrival_s, dtype=np.float64)
        prompt = np.asarray(self.prompt_len, dtype=np.int64)
        output = np.asarray(self.output_len, dtype=np.int64)
        if not (arrival.ndim == prompt.ndim == output.ndim == 1) or not (len(arrival) == len(prompt) == len(output)):
            raise ValueError(
                f"trace arrays must be 1-D of one length, got {arrival.shape=}, {prompt.shape=}, {output.shape=}"
            )
        if len(arrival) and (not np.all(np.isfinite(arrival)) or arrival.min() < 0):
            raise ValueError(f"arrival_s must be finite and >= 0, got min={arrival.min()}")
        if len(prompt) and prompt.min() < 1:
            raise ValueError(f"prompt_len must be >= 1, got {int(prompt.min())} at index {int(prompt.argmin())}")
        if len(output) and output.min() < 1:
            raise ValueError(f"output_len must be >= 1, got {int(output.min())} at index {int(output.argmin())}")
        order = np.argsort(arrival, kind="stable")
        for name, arr in (("arrival_s", arrival), ("prompt_len", prompt), ("output_len", output)):
            arr = arr[order]
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def from_entries(cls, entries: Iterable[TraceEntry]) -> "Trace":
        rows = [(e.arrival_s, e.prompt_len, e.output_len) for e in entries]
        arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
        return cls(arrival_s=arr[:, 0], prompt_len=arr[:, 1].astype(np.int64), output_len=arr[:, 2].astype(np.int64))

    def __len__(self) -> int:
        return len(self.arrival_s)

    @overload
    def __getitem__(self, i: int) -> TraceEntry: ...
    @overload
    def __getitem__(self, i: slice) -> "Trace": ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return Trace(arrival_s=self.arrival_s[i], prompt_len=self.prompt_len[i], output_len=self.output_len[i])
        return TraceEntry(arrival_s=float(self.arrival_s[i]), prompt_len=int(self.prompt_len[i]), output_len=int(self.output_len[i]))

    def __iter__(self) -> Iterator[TraceEntry]:
        for t, p, o in zip(self.arrival_s.tolist(), self.prompt_len.tolist(), self.output_len.tolist()):
            yield TraceEntry(arrival_s=t, prompt_len=p, output_len=o)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Trace):
            return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("arrival_s", "prompt_len", "output_len"))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container semantics: unhashable

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second: (N - 1) gaps over the span from first to last arrival."""
        span = self.duration_s
        return (len(self) - 1) / span if span > 0 else math.inf

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.prompt_len.tolist(), self.output_len.tolist()))

    def head(self, n: int) -> "Trace":
        return self[:n]

    def with_arrivals(self, arrival_s: np.ndarray) -> "Trace":
        return Trace(arrival_s=arrival_s, prompt_len=self.prompt_len, output_len=self.output_len)

    def stats(self) -> dict[str, float]:
        """Length statistics, handy for docs and logs."""
        p, o = self.prompt_len, self.output_len
        return {
            "num_requests": len(self),
            "prompt_mean": float(p.mean()),
            "prompt_median": float(np.median(p)),
            "output_mean": float(o.mean()),
            "output_median": float(np.median(o)),
            "mean_rate": self.mean_rate,
        }


# ---------------------------------------------------------------------------------------------
# Arrivals


def _gaps(rng: np.random.Generator, n: int, rate: float, arrival: str, cv: float) -> np.ndarray:
    """n i.i.d. inter-arrival gaps with mean 1/rate (the one place gaps are drawn)."""
    if arrival == "poisson":
        return rng.exponential(1.0 / rate, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (shape * rate), size=n)


def _arrival_times(rng: np.random.Generator, num_requests: int, config: TraceConfig) -> np.ndarray:
    """The first request at `config.start_s`, then num_requests - 1 gaps drawn from `rng`."""
    gaps = _gaps(rng, max(num_requests - 1, 0), config.rate, config.arrival, config.cv)
    return (config.start_s + np.concatenate([[0.0], np.cumsum(gaps)]))[:num_requests]


def arrival_times(num_requests: int, config: TraceConfig) -> list[float]:
    """Seeded arrival times in seconds (`default_rng(config.seed)`), non-decreasing, the first at
    `config.start_s`."""
    if num_requests < 0:
        raise ValueError(f"{num_requests=} must be >= 0")
    return [float(t) for t in _arrival_times(np.random.default_rng(config.seed), num_requests, config)]


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """Gamma-renewal arrivals: mean gap 1/rate, coefficient of variation `cv` (first gap included)."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"need rate > 0 and cv > 0, got {rate=}, {cv=}")
    return np.cumsum(_gaps(rng, n, rate, "gamma", cv))


def make_trace(lengths: Sequence[tuple[int, int]], config: TraceConfig) -> Trace:
    """Pairs each (prompt_len, output_len), in order, with the next arrival time."""
    pairs = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
    times = arrival_times(len(pairs), config)
    return Trace(arrival_s=np.asarray(times, dtype=np.float64), prompt_len=pairs[:, 0], output_len=pairs[:, 1])


# ---------------------------------------------------------------------------------------------
# Length samplers


class LengthSampler(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (prompt_lens, output_lens), int arrays of length n, every value >= 1."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedLengths:
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"lengths must be >= 1, got {self.prompt_len=}, {self.output_len=}")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_len, dtype=np.int64), np.full(n, self.output_len, dtype=np.int64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformLengths:
    """Integers uniform on [min, max] inclusive, prompt and output independent."""

    prompt_min: int
    prompt_max: int
    output_min: int
    output_max: int

    def __post_init__(self) -> None:
        if not (1 <= self.prompt_min <= self.prompt_max and 1 <= self.output_min <= self.output_max):
            raise ValueError(
                f"need 1 <= min <= max, got prompt [{self.prompt_min}, {self.prompt_max}], "
                f"output [{self.output_min}, {self.output_max}]"
            )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.integers(self.prompt_min, self.prompt_max + 1, size=n)
        o = rng.integers(self.output_min, self.output_max + 1, size=n)
        return p.astype(np.int64), o.astype(np.int64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LognormalLengths:
    """Independent lognormal prompt and output lengths, rounded, >= 1.

    Pairs with prompt + output >= `max_total` are redrawn (DistServe's ShareGPT preparation drops
    such pairs), so the realised means are a little below the uncapped lognormal means
    median * exp(sigma^2 / 2).
    """

    prompt_median: float
    prompt_sigma: float
    output_median: float
    output_sigma: float
    max_total: int = 2048

    def __post_init__(self) -> None:
        if min(self.prompt_median, self.output_median) <= 0 or min(self.prompt_sigma, self.output_sigma) < 0:
            raise ValueError(f"medians must be > 0 and sigmas >= 0, got {self}")
        if self.max_total < 3:
            raise ValueError(f"max_total={self.max_total} must be >= 3")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompts: list[np.ndarray] = []
        outputs: list[np.ndarray] = []
        have = 0
        while have < n:
            m = max(2 * (n - have), 16)
            p = np.maximum(1, np.rint(rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, m)))
            o = np.maximum(1, np.rint(rng.lognormal(math.log(self.output_median), self.output_sigma, m)))
            keep = p + o < self.max_total
            prompts.append(p[keep].astype(np.int64))
            outputs.append(o[keep].astype(np.int64))
            have += int(keep.sum())
        return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PairLengths:
    """Draw (prompt_len, output_len) pairs from a list, e.g. a real dataset's.

    `shuffle=True` samples with replacement; `shuffle=False` cycles through the list in order.
    """

    pairs: Sequence[tuple[int, int]]
    shuffle: bool = True

    def __post_init__(self) -> None:
        arr = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        if len(arr) == 0:
            raise ValueError("PairLengths needs at least one (prompt_len, output_len) pair")
        if arr.min() < 1:
            bad = arr[np.any(arr < 1, axis=1)][0]
            raise ValueError(f"pair lengths must be >= 1, got {tuple(int(x) for x in bad)}")
        object.__setattr__(self, "pairs", arr)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(self.pairs)
        idx = rng.integers(0, len(arr), size=n) if self.shuffle else np.arange(n) % len(arr)
        return arr[idx, 0].copy(), arr[idx, 1].copy()


# ShareGPT-like lengths as DistServe prepares ShareGPT (prompt = leading turns of a conversation,
# output = the next reply, pairs with prompt + output >= 2048 OPT tokens dropped). After the cap the
# prompt mean is ~680 tokens (median ~575) and the output mean ~190 (median ~115). Real ShareGPT
# lengths come from `dsjax.workloads.load_workload("sharegpt")`; see docs/planner.md ("Workloads").
SHAREGPT_LIKE = LognormalLengths(prompt_median=650.0, prompt_sigma=0.85, output_median=120.0, output_sigma=1.1)


def length_sampler_from_spec(spec: str) -> LengthSampler:
    """Parse a short spec: 'sharegpt-like', 'fixed:P:O', 'uniform:Pmin:Pmax:Omin:Omax',
    'lognormal:Pmedian:Psigma:Omedian:Osigma[:max_total]'."""
    parts = spec.split(":")
    kind, args = parts[0], parts[1:]
    try:
        if kind == "sharegpt-like" and not args:
            return SHAREGPT_LIKE
        if kind == "fixed" and len(args) == 2:
            return FixedLengths(prompt_len=int(args[0]), output_len=int(args[1]))
        if kind == "uniform" and len(args) == 4:
            a = [int(x) for x in args]
            return UniformLengths(prompt_min=a[0], prompt_max=a[1], output_min=a[2], output_max=a[3])
        if kind == "lognormal" and len(args) in (4, 5):
            f = [float(x) for x in args[:4]]
            extra = {"max_total": int(args[4])} if len(args) == 5 else {}
            return LognormalLengths(prompt_median=f[0], prompt_sigma=f[1], output_median=f[2], output_sigma=f[3], **extra)
    except ValueError as e:
        raise ValueError(f"bad length spec {spec!r}: {e}") from e
    raise ValueError(
        f"unknown length spec {spec!r}; expected sharegpt-like, fixed:P:O, uniform:Pmin:Pmax:Omin:Omax "
        "or lognormal:Pmed:Psig:Omed:Osig[:max_total]"
    )


def generate_trace(
    *,
    num_requests: int,
    rate: float,
    lengths: LengthSampler,
    arrival: str = "poisson",
    cv: float = 1.0,
    seed: int = 0,
) -> Trace:
    """A seeded synthetic trace: `num_requests` sampled lengths at mean `rate` req/s, the first at 0.

    One `default_rng(seed)` stream draws the lengths, then the arrival gaps (as `arrival_times`
    does, continuing the stream); `cv` is ignored for Poisson arrivals."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    config = TraceConfig(rate=rate, arrival=arrival, cv=cv if arrival == "gamma" else 1.0, seed=seed)
    rng = np.random.default_rng(seed)
    prompt, output = lengths.sample(rng, num_requests)
    return Trace(arrival_s=_arrival_times(rng, num_requests, config), prompt_len=prompt, output_len=output)


def rescale_rate(trace: Trace, rate: float) -> Trace:
    """Scale arrival times so the trace's mean rate ((N-1) / span) becomes `rate`.

    The first request is moved to t=0; the shape of the arrival process (burstiness) is kept.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate={rate} must be a positive finite number")
    rel = trace.arrival_s - (trace.arrival_s[0] if len(trace) else 0.0)
    span = float(rel[-1]) if len(trace) > 1 else 0.0
    if span <= 0:
        return trace.with_arrivals(np.zeros(len(trace)))
    return trace.with_arrivals(rel * ((len(trace) - 1) / span / rate))


def resample(trace: Trace, *, num_requests: int, seed: int = 0, arrival: str = "poisson", cv: float = 1.0) -> Trace:
    """A unit-rate trace of `num_requests` requests whose lengths come from `trace`.

    With at least `num_requests` requests the trace's first requests and its own arrival pattern are
    kept; otherwise lengths are drawn with replacement and arrivals are generated (Poisson or gamma).
    Either way the result is rescaled to mean rate 1, ready for `rescale_rate`.
    """
    if len(trace) >= max(num_requests, 2):
        return rescale_rate(trace.head(num_requests), 1.0)
    return rescale_rate(
        generate_trace(
            num_requests=num_requests, rate=1.0, lengths=PairLengths(pairs=trace.pairs()), arrival=arrival, cv=cv, seed=seed
        ),
        1.0,
    )


# ---------------------------------------------------------------------------------------------
# JSON Lines I/O


def write_trace(path: str | Path, entries: Iterable[TraceEntry]) -> None:
    """Writes one JSON object a line (a `Trace` or any iterable of `TraceEntry`); floats exactly."""
    with open(path, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(entry.to_json() + "\n")


def read_trace(path: str | Path) -> Trace:
    """Read a JSON Lines trace; raises ValueError naming the file and line of a bad record."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"trace file {str(p)!r} does not exist")
    entries = []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                entries.append(
                    TraceEntry(
                        arrival_s=float(item["arrival_s"]),
                        prompt_len=int(item["prompt_len"]),
                        output_len=int(item["output_len"]),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{p}:{line_no}: bad trace record {line.strip()[:120]!r}: {err!r}") from err
    return Trace.from_entries(entries)
