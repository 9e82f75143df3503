"""Two readings of an emulated run's gap to the simulator (dsjax/bench/emucompare.py).

An emulated device removes step-time noise, but two things still separate a run from the
simulator's replay of its trace:

- **Host time.** The engine's own Python time between a step's end and the launch of the next
  one (scheduling, bookkeeping, streaming tokens, the GIL shared with the router and every other
  instance of its process) leaves the emulated device idle, as a late host leaves a GPU idle. The
  emulated runner measures it before every decode step that continues running requests and before
  every prompt batch (InstanceStats `continued_steps`/`host_gap_seconds`,
  `prefill_launches`/`prefill_host_gap_seconds`; dsjax/runtime/emulated.py); `simulated_with_host`
  replays the run with the measured means charged (SimConfig.decode_host_s, prefill_host_s), and
  every TTFT longer by the run's median hop from the engine to the client (router and client
  parts of `ttft_decomposition`: the simulator's TTFT ends at the engine). What that closes of the
  gap is host time; what it leaves is a difference between the simulator's model of the
  scheduler and the real one, or host time's spread about its mean.
- **Chaos at a knee.** Near its capacity a server's attainment depends on the exact order of
  events: the simulator itself, replaying the same trace with every send time moved by up to 1 ms
  (a host's timer jitter), moves by several points there. `jitter_band` gives the range of the
  simulator's attainment over `JITTER_SEEDS` such replays; a gap inside that band is below what
  any implementation could be held to at that rate.
- **Arrivals.** The simulator replays the *scheduled* send times; the server saw each request
  when the client sent it and the router parsed it, a fraction of a millisecond to milliseconds
  later, and at a knee that alone moves the attainment (the jitter band above). `arrival_replay`
  replays the router's own arrival times (`RequestResult.server_arrival_s`) and compares with the
  attainment the router measured (its TTFT from that arrival, TPOT as the client saw it): what
  is left is the scheduler against its model, the engines' host time and the router's internal
  hop, with the client's sending and delivery taken out.
- **The gap as a rate.** Past a long-output workload's knee, attainment falls tens of points
  within a few percent of rate (the cliff of docs/results.md, session 12), so points there say
  little. `rate_equivalent_gap_pct` reads the gap on the rate axis: the change of the run's rate
  at which the simulator, replaying the same arrival pattern compressed or stretched, attains
  what the run measured (+2: the run did as the simulator does at a 2% higher rate).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

JITTER_SEEDS = 6
RATE_SPAN = 0.25  # the rate-equivalent gap is searched within +-25% of the run's rate
RATE_STEPS = 7  # its bisection steps: 0.25 / 2^7, 0.2% of the rate
HOST_COUNTERS = ("continued_steps", "host_gap_seconds", "prefill_launches", "prefill_host_gap_seconds",
                 "leases_expired")  # the last: prefill KV freed unpulled (its request recomputed)


def host_counters(target: str, token: str) -> Callable[[], dict[str, float]]:
    """A function summing every live instance's host-time counters (Admin/Instances, with the
    cluster's token): `sweep_target(counters=...)`."""
    from dsjax.bench.servers import admin_instances

    def read() -> dict[str, float]:
        live = [i for i in admin_instances(target, token) if i.alive]
        return {k: float(sum(getattr(i, k) for i in live)) for k in HOST_COUNTERS}

    return read


def mean_host_s(counters: dict[str, float] | None, gap: str = "host_gap_seconds",
                count: str = "continued_steps") -> float | None:
    """Mean host time per continued decode step (or, with the prefill keys, per prompt batch) over
    a run; None when nothing was counted."""
    if not counters or counters.get(count, 0) <= 0:
        return None
    return max(0.0, counters[gap]) / counters[count]


def attainment(sim, requests, offsets, ttft_extra_s: float = 0.0) -> float:
    full = sim.result_all(requests, offsets)
    if ttft_extra_s:
        full = dataclasses.replace(full, ttft_s=full.ttft_s + ttft_extra_s)
    return sim.measured_part(full, offsets).attainment


def front_end_s(row: dict[str, Any]) -> float:
    """The run's median TTFT from the engine to the client (0 where not measured)."""
    parts = [row.get("ttft_router_minus_engine_ms"), row.get("ttft_client_minus_router_ms")]
    return sum(p[0] for p in parts if p) / 1e3


def fidelity_extras(row: dict[str, Any], run, sim, requests, offsets, *, seed: int,
                    jitter: Callable[[list[float], int], list[float]], jittered=None,
                    schedule: Callable[[float], list[float]] | None = None) -> dict[str, Any]:
    """The row's host-time replay, the simulator's jitter band and, given `schedule` (the send
    offsets of a run at a rate), the gap as a rate (keys added to a fidelity row).
    `jittered`: the replay at `jitter(offsets, seed)` when the caller has it (not run again)."""
    out: dict[str, Any] = {}
    c = run.server_counters
    if c:
        out["leases_expired"] = int(c.get("leases_expired", 0))
    decode_s = mean_host_s(c)
    prefill_s = mean_host_s(c, "prefill_host_gap_seconds", "prefill_launches")
    if decode_s is not None or prefill_s is not None:
        hop = front_end_s(row)
        with_host = attainment(sim.with_host_time(decode_s or 0.0, prefill_s or 0.0), requests, offsets, hop)
        out.update(front_end_ms=round(1e3 * hop, 3), decode_host_ms=round(1e3 * (decode_s or 0.0), 3),
                   continued_steps=int(c.get("continued_steps", 0)), prefill_host_ms=round(1e3 * (prefill_s or 0.0), 3), prefill_launches=int(c.get("prefill_launches", 0)),
                   simulated_with_host=with_host, diff_with_host_points=100 * (row["real"] - with_host))
    band = [row["simulated"]]
    for k in range(JITTER_SEEDS):
        moved = jitter(offsets, seed + k)
        if k == 0 and jittered is not None:
            band.append(sim.measured_part(jittered, moved).attainment)
        else:
            band.append(attainment(sim, requests, moved))
    lo, hi = min(band), max(band)
    out["sim_jitter_band"] = [lo, hi]
    out["gap_beyond_jitter_points"] = 100 * max(0.0, lo - row["real"], row["real"] - hi)
    out.update(arrival_replay(run, sim, requests, offsets))
    if schedule is not None:
        out.update(rate_gap(row["real"], row["simulated"], sim, requests, schedule, row["rate"]))
    return out


def arrival_replay(run, sim, requests, offsets) -> dict[str, Any]:
    """The run's gap with the router's arrival times replayed (module docstring, "Arrivals"):
    `router_side_attainment` (TTFT from the router's arrival to its first token, TPOT as the
    client saw it; a failed or unsent request misses), `simulated_at_arrivals` (the simulator with
    every request arriving when the router received it, a request it never received at its
    scheduled time), their `arrival_replay_gap_points`, and `arrival_lag_ms` (router arrival minus
    schedule, p50 / p90 / max). Empty when the run has no router arrival times or is not one
    request per offset."""
    import numpy as np

    from dsjax.bench.metrics import meets_tpot

    results = run.results
    if len(results) != len(offsets) or all(r.server_arrival_s is None for r in results):
        return {}
    arrivals = [float(offsets[i]) if r.server_arrival_s is None else max(0.0, r.server_arrival_s)
                for i, r in enumerate(results)]
    full = sim.result_at(requests, arrivals)
    k0 = run.measured_from
    simulated = dataclasses.replace(full, ttft_s=full.ttft_s[k0:], tpot_s=full.tpot_s[k0:]).attainment
    ok = [r.server_ttft_s is not None and r.server_ttft_s <= sim.slos.ttft_s and meets_tpot(r.record, sim.slos.tpot_s)
          for r in run.measured]
    router_side = float(np.mean(ok)) if ok else 1.0
    lag = [r.server_arrival_s - r.scheduled_s for r in results if r.server_arrival_s is not None]
    return {"router_side_attainment": router_side, "simulated_at_arrivals": simulated,
            "arrival_replay_gap_points": 100 * (router_side - simulated),
            "arrival_lag_ms": [round(1e3 * float(v), 3) for v in (*np.percentile(lag, [50, 90]), max(lag))]}


def rate_gap(real: float, simulated: float, sim, requests, schedule: Callable[[float], list[float]],
             rate: float) -> dict[str, Any]:
    """A fidelity row's gap read as a rate (`rate_equivalent` within RATE_SPAN): the key
    `rate_equivalent_gap_pct`; beyond the span, the span's end (a lower bound of the gap) and
    `rate_equivalent_beyond_span`. `simulated` is the simulator's attainment at `rate` itself."""
    f = rate_equivalent(real, lambda k: simulated if k == 1.0 else attainment(sim, requests, schedule(rate * k)),
                        span=RATE_SPAN, steps=RATE_STEPS)
    if f is None:
        sign = 1 if real < simulated else -1
        return {"rate_equivalent_gap_pct": sign * 100 * RATE_SPAN, "rate_equivalent_beyond_span": True}
    return {"rate_equivalent_gap_pct": round(100 * (f - 1), 2)}


def rate_equivalent(real: float, attainment_at: Callable[[float], float], *, span: float = 0.25,
                    steps: int = 10, tol: float = 1e-9) -> float | None:
    """The rate factor f within [1 - span, 1 + span] at which the simulator's attainment,
    `attainment_at(f)` (at f x the run's rate; f = 1 is the run), equals the run's `real`
    attainment: bisection on the simulator's attainment, which falls with the rate. 1.0 when they
    agree; None when the span's end does not reach the run's attainment."""
    def gap(f: float) -> float:
        return attainment_at(f) - real

    at_one = gap(1.0)
    if abs(at_one) <= tol:
        return 1.0
    if at_one > 0:  # the run attained less: it behaved as the simulator at a higher rate
        lo, hi = 1.0, 1.0 + span
        if gap(hi) > 0:
            return None
    else:
        lo, hi = 1.0 - span, 1.0
        if gap(lo) < 0:
            return None
    for _ in range(steps):  # invariant: gap(lo) > 0 >= gap(hi)
        mid = (lo + hi) / 2
        if gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def extras_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest gaps of these rows under each reading (None where no row has it)."""
    def worst(key):
        vals = [abs(r[key]) for r in rows if r.get(key) is not None]
        return max(vals) if vals else None

    return {"max_gap_with_host_points": worst("diff_with_host_points"),
            "max_gap_beyond_jitter_points": worst("gap_beyond_jitter_points"),
            "max_rate_equivalent_gap_pct": worst("rate_equivalent_gap_pct"),
            "max_arrival_replay_gap_points": worst("arrival_replay_gap_points")}
