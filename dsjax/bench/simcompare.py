"""The planner's simulator on the benchmark's own trace: real vs simulated attainment.

For every system and rate the benchmark ran, the simulator replays the *same* requests (lengths as
served) at the *same* scheduled send times, with the latency profile measured on this machine and
the engine's scheduler limits, and reports its attainment beside the measured one (the planner's
fidelity check, DistServe Table 2: goal within 3 points).

Mapping of the engine's settings (dsjax/engine/scheduler.py, `python -m dsjax.serve` flags) onto
`planner.SimConfig`: L_m = prefill token budget = --max-prefill-tokens, prefill batch <= 16
requests, decode batch <= --max-num-seqs, colocated prefill budget and chunked step budget =
--max-prefill-tokens. KV capacity is not limited: the server's default pool holds max-num-seqs full
contexts, so the batch cap binds first. KV transfers cost nothing (the real transfer time is
reported separately from the servers' latency breakdown).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np

from dsjax.bench.analysis import SLOs
from dsjax.bench.metrics import goodput
from dsjax.bench.records import BenchRequest
from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.planner.latency import Profile
from dsjax.planner.model_spec import DeviceSpec, MemoryModel, get_model
from dsjax.planner.simulator import SimConfig, Simulator
from dsjax.planner.slo import SLO
from dsjax.workloads.trace_gen import Trace

# The engine's SchedulerConfig.max_prefill_seqs default (not a serve flag).
ENGINE_MAX_PREFILL_SEQS = 16
_HOST = DeviceSpec(name="cpu-host", memory_bytes=64 * 2**30)


def placement_for(system: str, num_devices: int = 2) -> Placement:
    """The placement each benchmarked system uses on `num_devices` single-core devices."""
    if system == "disaggregated":
        if num_devices != 2:
            raise ValueError(f"the disaggregated system here is 1 prefill + 1 decode device, not {num_devices}")
        return Placement(prefill=PhaseParallel(), decode=PhaseParallel())
    return Placement.colocated(tp=1, pp=1, replicas=num_devices, mode=system)


def scheduler_config(*, max_num_seqs: int, max_prefill_tokens: int, transfer_fixed_s: float = 0.0,
                     link_bytes_per_s: float | None = None, decode_join_s: float = 0.0) -> SimConfig:
    return SimConfig(
        transfer_fixed_s=transfer_fixed_s,
        decode_join_s=decode_join_s,
        link_bytes_per_s=link_bytes_per_s,
        chunked_fused_steps=False,  # the engine's CPU default (dsjax/engine/colocated.py)
        prefill_token_budget=max_prefill_tokens,
        prefill_max_batch_size=ENGINE_MAX_PREFILL_SEQS,
        decode_max_batch_size=max_num_seqs,
        colocated_token_budget=max_prefill_tokens,
        chunk_tokens=max_prefill_tokens,
        kv_capacity_limit=False,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimulatedRun:
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft_p90_s: float
    tpot_p90_s: float


class TraceSimulator:
    """One system's simulator, replaying benchmark schedules."""

    def __init__(self, *, system: str, profile: Profile, model: str, slos: SLOs, max_num_seqs: int, max_prefill_tokens: int,
                 transfer_fixed_s: float = 0.0, link_bytes_per_s: float | None = None, decode_join_s: float = 0.0,
                 placement: Placement | None = None, config: SimConfig | None = None, memory: MemoryModel | None = None):
        """`placement`, `config` and `memory` (the emulated compare's: any cluster, the engine's
        limits, real device memory) default to the two-core CPU setting above."""
        spec = get_model(model)
        self.slos = slos
        self.settle_s = 0.0  # requests scheduled before this are not measured (sweep.SweepConfig.settle_s)
        self.sim = Simulator(
            placement=placement or placement_for(system), profile=profile, model=spec,
            memory=memory or MemoryModel(model=spec, device=_HOST),
            config=config or scheduler_config(max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                                              transfer_fixed_s=transfer_fixed_s, link_bytes_per_s=link_bytes_per_s,
                                              decode_join_s=decode_join_s),
        )

    @classmethod
    def calibrated(cls, cal: "ServedCalibration", *, system: str, model: str, slos: SLOs, max_num_seqs: int,
                   max_prefill_tokens: int) -> "TraceSimulator":
        """The simulator of a served calibration (profile, transfer and join costs)."""
        return cls(system=system, profile=cal.profile, model=model, slos=slos, max_num_seqs=max_num_seqs,
                   max_prefill_tokens=max_prefill_tokens, transfer_fixed_s=cal.transfer_fixed_s,
                   link_bytes_per_s=cal.link_bytes_per_s, decode_join_s=cal.decode_join_s)

    def with_host_time(self, decode_s: float, prefill_s: float = 0.0) -> "TraceSimulator":
        """This simulator charging host time before every decode step and prompt batch
        (SimConfig.decode_host_s, prefill_host_s)."""
        other = copy.copy(self)
        other.sim = copy.copy(self.sim)
        other.sim.config = dataclasses.replace(self.sim.config, decode_host_s=decode_s, prefill_host_s=prefill_s)
        return other

    def result(self, requests: Sequence[BenchRequest], offsets_s: Sequence[float]):
        """The simulator's `SimResult` (per-request TTFT and TPOT) of these requests sent at these
        offsets (the first len(offsets_s) requests: a run of sweep.requests_at sends a prefix)."""
        return self.measured_part(self.result_all(requests, offsets_s), offsets_s)

    def measured_part(self, full, offsets_s: Sequence[float]):
        """Of `result_all`'s SimResult, the requests the benchmark measures (LoadRun.records):
        those scheduled from `settle_s` on."""
        if self.settle_s <= 0:
            return full
        from dsjax.bench.sweep import settled_index

        k0 = settled_index(offsets_s, self.settle_s)
        return dataclasses.replace(full, ttft_s=full.ttft_s[k0:], tpot_s=full.tpot_s[k0:])

    def result_all(self, requests: Sequence[BenchRequest], offsets_s: Sequence[float]):
        """`result` of every request, the settling ones included."""
        if len(offsets_s) > len(requests):
            raise ValueError(f"{len(offsets_s)} send offsets for {len(requests)} requests")
        requests = requests[:len(offsets_s)]
        trace = Trace(
            arrival_s=np.asarray(offsets_s, dtype=np.float64),
            prompt_len=np.array([r.prompt_len for r in requests]),
            output_len=np.array([r.output_len for r in requests]),
        )
        return self.sim.run(trace, slo=SLO(ttft_s=self.slos.ttft_s, tpot_s=self.slos.tpot_s))

    def result_at(self, requests: Sequence[BenchRequest], arrivals_s: Sequence[float]):
        """`result_all` with request i arriving at `arrivals_s[i]`, in any order (a server's own
        arrival times, where two requests sent close together may land the other way round); the
        SimResult's arrays are in request order (result_all's are in arrival order: the trace is
        sorted by arrival)."""
        arrivals = np.asarray(arrivals_s, dtype=np.float64)
        order = np.argsort(arrivals, kind="stable")
        full = self.result_all([requests[int(i)] for i in order], arrivals[order])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return dataclasses.replace(full, ttft_s=full.ttft_s[back], tpot_s=full.tpot_s[back])

    def run(self, requests: Sequence[BenchRequest], offsets_s: Sequence[float]) -> SimulatedRun:
        result = self.result(requests, offsets_s)
        s = result.summary()
        return SimulatedRun(attainment=result.attainment, ttft_attainment=result.ttft_attainment,
                            tpot_attainment=result.tpot_attainment, ttft_p90_s=s["ttft_p90_s"], tpot_p90_s=s["tpot_p90_s"])

    def goodput(self, requests: Sequence[BenchRequest], schedule, rates: Sequence[float]) -> float:
        """Simulated goodput with the benchmark's own search (`schedule(rate)` gives send offsets)."""
        return goodput(lambda rate: self.run(requests, schedule(rate)).attainment, list(rates),
                       target=self.slos.target, rel_tol=0.01).rate


# ---- the served calibration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServedCalibration:
    """What a system's warm-up measured for the simulator: a latency profile fitted on its served
    steps (dsjax/planner/served.py) and the KV transfer time, fixed + bytes / bandwidth
    (disaggregated; both 0 / None for colocated systems)."""

    profile: Profile
    transfer_fixed_s: float
    link_bytes_per_s: float | None
    info: dict
    decode_join_s: float = 0.0  # landing a pulled request's KV on the decode worker


def fit_transfer(samples: Sequence[tuple[float, float]]) -> tuple[float, float | None]:
    """(fixed seconds, bytes per second) of transfer_s = fixed + bytes / bw, least squares with
    both terms >= 0, from (kv_bytes, transfer_s) samples; (median, None) when the bytes do not
    explain the times (slope <= 0) or there are fewer than 3 samples."""
    if not samples:
        return 0.0, None
    x = np.array([b for b, _ in samples], float)
    y = np.array([t for _, t in samples], float)
    if len(samples) >= 3 and np.ptp(x) > 0:
        slope, fixed = np.polyfit(x, y, 1)
        if slope > 0:
            if fixed < 0:  # through the origin instead
                slope, fixed = float(x @ y / (x @ x)), 0.0
            return float(fixed), float(1.0 / slope)
    return float(np.median(y)), None


def served_calibration(*, step_log_dir, window: tuple[float, float], base: Profile, model: str,
                       warmup_runs: Sequence = (), disaggregated: bool = False) -> ServedCalibration:
    """Fit on the step records of `window` (the warm-up: not the measured runs) in every
    `*.jsonl` of `step_log_dir`. The transfer time is fitted on the requests of the last warm-up
    run (the lowest scan rate, where a transfer waits for little else). `disaggregated`: the
    decode worker's KV landing is fitted apart from its steps (served.py, `split_joins`)."""
    from dsjax.planner.served import fit_served_best, served_profile

    logs = _step_logs(step_log_dir)
    records = in_window(step_records(step_log_dir), window)
    base_buckets = base.buckets
    fit, buckets = fit_served_best(records, block_size=base_buckets.block_size if base_buckets else 16,
                                   base=base.coeffs(model, 1), split_joins=disaggregated)
    samples = []
    if warmup_runs:
        samples = [(r.breakdown.kv_bytes, r.breakdown.transfer_s) for r in warmup_runs[-1].results
                   if r.record.ok and r.breakdown is not None and r.breakdown.transfer_s > 0]
    fixed, bw = fit_transfer(samples)
    profile = served_profile(base, model, 1, fit, logs=[str(p) for p in logs], buckets=buckets)
    info = dict(profile.metadata["served_fit"], attention_features=buckets.attention, transfer_fixed_s=fixed, link_bytes_per_s=bw, transfer_samples=len(samples),
                steps_in_window=len(records), coeffs=fit.coeffs.to_json())
    return ServedCalibration(profile=profile, transfer_fixed_s=fixed, link_bytes_per_s=bw, info=info,
                             decode_join_s=fit.decode_join_ms * 1e-3)


def _step_logs(step_log_dir) -> list:
    from pathlib import Path

    logs = sorted(Path(step_log_dir).glob("*.jsonl"))
    if not logs:
        raise ValueError(f"no step logs in {step_log_dir}")
    return logs


def step_records(step_log_dir) -> list[dict]:
    """Every record of every `*.jsonl` step log in `step_log_dir`, log after log, each in its
    loop's order (what planner/served.py expects). Read once, then cut with `in_window`."""
    from serving.step_log import read_step_log

    return [rec for p in _step_logs(step_log_dir) for rec in read_step_log(p)]


def in_window(records: Sequence[dict], window: tuple[float, float]) -> list[dict]:
    """The records that started in [window[0], window[1]) (read_step_log's since / until)."""
    return [rec for rec in records if window[0] <= float(rec["t"]) < window[1]]


def speed_scaled(cal: ServedCalibration, *, records: Sequence[dict], window: tuple[float, float], model: str):
    """`cal` with its step costs rescaled to the machine's speed over `window` (planner/served.py,
    `speed_factors`), from a system's step `records` (`step_records`): the warm-up's shape
    dependence at the level the steps of `window` ran at. Returns (calibration, SpeedFactors);
    the calibration unchanged when the window holds no step."""
    from dsjax.planner.served import scale_coeffs, speed_factors, with_entry

    coeffs = cal.profile.coeffs(model, 1)
    factors = speed_factors(in_window(records, window), coeffs, buckets=cal.profile.buckets,
                            join_ms=cal.decode_join_s * 1e3 if cal.decode_join_s else None)
    profile = with_entry(cal.profile, model, 1, scale_coeffs(coeffs, factors))
    info = dict(cal.info, speed_factors=dataclasses.asdict(factors), speed_window=list(window))
    return dataclasses.replace(cal, profile=profile, info=info, decode_join_s=cal.decode_join_s * factors.decode), factors
