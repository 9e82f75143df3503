"""Steady state: what each system sustains, beside what a short run from an empty server shows.

A run starts with an empty server, and near its capacity a server's queues and running batches
grow for many request lifetimes before they stop growing. A run that ends before then measures a
transient that flatters every system, and not by the same amount. OPT-66B ShareGPT on 32 emulated
A100s (mean output 325 tokens, TPOT SLO 0.15 s): the simulator passes 22 req/s for the disaggregated
placement and 15 for vLLM-priced colocated on the quick compare's 73-s runs, and 16 and 11 once a
run lasts 12 mean lifetimes (586 s), where more length changes nothing (docs/results.md,
"Session 12").

So every emulated compare also reports each placement's **steady-state goodput**: the simulator's
goodput on the same workload sample sent for `STEADY_LIFETIMES` mean lifetimes (mean output x
TPOT SLO, at least 60 s; the planner's horizon, dsjax/planner/search.py), the first third settling
unmeasured. `compare --emulate --steady-state` runs the real servers that long, at two rates
bracketing that figure, to check it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

from dsjax.planner.search import GoodputConfig

STEADY_LIFETIMES = GoodputConfig.lifetimes
STEADY_MIN_S = GoodputConfig.horizon_s
STEADY_SETTLE_FRACTION = 1 / 3
# --steady-state: each system's rates, these factors x its steady-state goodput (one should pass,
# the other fail, if the simulator's knee is the server's), no bisection: each run is minutes long.
STEADY_RATE_FACTORS = (0.95, 1.1)


def steady_run_length(mean_output_len: float, tpot_slo_s: float) -> tuple[float, float]:
    """(settle_s, run_seconds) of a steady-state run: `STEADY_LIFETIMES` mean lifetimes at the TPOT
    SLO's pace (at least `STEADY_MIN_S`), the first third unmeasured."""
    if mean_output_len <= 0 or tpot_slo_s <= 0:
        raise ValueError(f"need mean_output_len={mean_output_len} > 0 and tpot_slo_s={tpot_slo_s} > 0")
    total = max(STEADY_MIN_S, STEADY_LIFETIMES * mean_output_len * tpot_slo_s)
    return round(STEADY_SETTLE_FRACTION * total, 1), round(total, 1)


def probe_rates(start: float) -> tuple[float, ...]:
    """Rates scanned upward for the steady-state goodput: from half of `start` (a short run's
    goodput, which the steady state rarely exceeds) to 1.4x it, in steps of 2^(1/8)."""
    if start <= 0:
        raise ValueError(f"start={start} must be > 0")
    return tuple(sorted({float(f"{start * 2 ** (i / 8):.3g}") for i in range(-8, 5)}))


def steady_state_goodputs(sims: Mapping[str, Any], requests: Sequence, schedule: Callable[[float], list[float]],
                          starts: Mapping[str, float], devices: Mapping[str, int], *, settle_s: float,
                          run_s: float) -> dict[str, Any]:
    """Each system's simulated goodput on steady-state runs (`schedule(rate)`: the send offsets of a
    run of `run_s` seconds; `requests` long enough for it), as `steady_summary`. `sims` are
    TraceSimulators; copies of them measure after `settle_s`."""
    goodputs, saturated = {}, {}
    for name, sim in sims.items():
        steady = copy.copy(sim)
        steady.settle_s = settle_s
        rates = probe_rates(starts[name])
        goodputs[name] = steady.goodput(requests, schedule, rates)
        saturated[name] = goodputs[name] >= rates[-1]
    return steady_summary(goodputs, devices, saturated, settle_s=settle_s, run_s=run_s)


def steady_summary(goodputs: Mapping[str, float], devices: Mapping[str, int], saturated: Mapping[str, bool], *,
                   settle_s: float, run_s: float) -> dict[str, Any]:
    """summary.json's `steady_state`: every system's goodput, per device, and the ratios of the
    disaggregated per-device goodput over each other system's."""
    systems = {name: {"goodput": g, "per_device_goodput": g / devices[name], "num_devices": devices[name],
                      "saturated": bool(saturated.get(name, False))} for name, g in goodputs.items()}
    out: dict[str, Any] = {"run_seconds": run_s, "settle_s": settle_s, "lifetimes": STEADY_LIFETIMES,
                           "systems": systems}
    disagg = systems.get("disaggregated", {}).get("per_device_goodput")
    for base in ("colocated", "chunked", "vllm"):
        other = systems.get(base, {}).get("per_device_goodput")
        if disagg is not None and other:
            out[f"disaggregated_over_{base}_ratio"] = disagg / other
    return out


def describe(steady: Mapping[str, Any]) -> str:
    """One log line: every system's steady-state goodput and the ratios."""
    parts = [f"{s} {v['goodput']:.3g} req/s ({v['per_device_goodput']:.3g}/device{', saturated' if v['saturated'] else ''})"
             for s, v in steady["systems"].items()]
    ratios = [f"{k.removeprefix('disaggregated_over_').removesuffix('_ratio')} {v:.2f}x"
              for k, v in steady.items() if k.endswith("_ratio")]
    return (f"steady state ({steady['run_seconds']:g}-s runs, first {steady['settle_s']:g} s unmeasured): "
            + ", ".join(parts) + ("; disaggregated over " + ", ".join(ratios) if ratios else ""))
