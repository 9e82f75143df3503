"""A latency profile fitted on *served* steps: the step logs the serving loop writes (`--step-log`).

The engine profiler (profiler.py) times the model runner alone, on a quiet process. A served step
also pays the engine loop, the gRPC threads of its process and the landing of pulled KV (see
serving/step_log.py for what one record measures); on our CPU host that adds 1–3 ms to a 2 ms
decode step, which decides whether a TPOT SLO of 11 ms holds. `fit_served` fits DistServe's forms
(latency.py) on those records, so the simulator costs a step as the server pays for it.

Which records are used: steps that made exactly one program call (a step that launched several
batches cannot be split between them), of two kinds:

    prefill: one prefill call, every chunk a whole prompt (start == 0)   -> (prompt lengths, ms)
    decode:  one decode call                                              -> (contexts, ms)

Mixed chunked-prefill steps (1-token decode chunks plus prompt chunks) are counted, not fitted:
the simulator costs them from the two fitted forms (LatencyModel.mixed_step_s).

Robustness: the records are grouped by the feature row of their padded shape (buckets.py: with
padded buckets every record of one program shape has the same features) and each group with at
least `min_group` records contributes one sample: the mean of its records after dropping those
over STALL_FACTOR x the group's median (first compilations, seconds long). The mean, not the
median, because a TPOT is an average over steps: the served steps' right tail (GIL contention,
GC; means run 4-15% above medians here) is part of what requests see. Busy shapes do not outvote
rare ones in the least-squares fit.

On top of the forms a fit keeps (docs/planner.md, "Served profile"):
- measured shape tables: every padded shape served >= TABLE_MIN_RECORDS times costs its own mean;
- with `split_joins` (decode-worker logs), the time to land a joining request's KV, apart from the
  step (`decode_join_ms`);
and `speed_factors` / `scale_coeffs` rescale a fit to the machine's speed over any window of steps.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.fitting import (
    decode_row,
    decode_sample_ms,
    fit_decode,
    fit_prefill,
    fit_profile,
    prefill_row,
    prefill_sample_ms,
    relative_errors,
)
from dsjax.planner.latency import DEFAULT_LARGE_BS_THRESHOLD, LatencyCoeffs, LatencyModel, Profile
from dsjax.planner.model_spec import canonical_model_name

Sample = tuple[list[int], float]
STALL_FACTOR = 5.0  # a step over 5x its shape's median time is a compilation, not a served cost
# A padded shape served at least this often keeps its own measured mean (LatencyCoeffs tables);
# rarer shapes are costed by the fitted form.
TABLE_MIN_RECORDS = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServedSamples:
    """Single-call served steps, by kind; `mixed` and `multi` are only counted. With
    `split_joins`, decode steps after which requests joined the batch are kept apart in
    `decode_joined` as (contexts, ms, number joined)."""

    prefill: list[Sample]
    decode: list[Sample]
    mixed: int = 0
    multi: int = 0
    decode_joined: list[tuple[list[int], float, int]] = dataclasses.field(default_factory=list)


# Two records are consecutive steps of one loop when the second starts within this long after the
# first ends (a record ends where the loop would start its next step).
_CONTIGUOUS_S = 0.02


def _joins_after(rec: Mapping[str, Any], nxt: Mapping[str, Any] | None) -> int:
    """Requests in `nxt`'s decode call that were not in `rec`'s (whose context did not just grow
    by one): the requests that joined the batch between the two steps; 0 when `nxt` is not the
    next decode step of the same loop."""
    if nxt is None or len(nxt["calls"]) != 1 or nxt["calls"][0]["kind"] != "decode":
        return 0
    if float(nxt["t"]) - (float(rec["t"]) + float(rec["ms"]) * 1e-3) > _CONTIGUOUS_S or float(nxt["t"]) < float(rec["t"]):
        return 0
    grown = defaultdict(int)
    for c in rec["calls"][0]["ctx"]:
        grown[int(c) + 1] += 1
    joined = 0
    for c in nxt["calls"][0]["ctx"]:
        if grown[int(c)] > 0:
            grown[int(c)] -= 1
        else:
            joined += 1
    return joined


def served_samples(records: Iterable[Mapping[str, Any]], *, split_joins: bool = False) -> ServedSamples:
    """Records in log order (the order of one loop's steps; several logs may follow each other).

    On dsjax's decode worker the KV of a pulled request is landed in the pool between two steps:
    that time falls into the record of the step before the request first appears. `split_joins`
    keeps those records out of the decode samples, so the fit is the step alone and the landing is
    fitted separately (`ServedFit.decode_join_ms`)."""
    records = list(records)
    prefill: list[Sample] = []
    decode: list[Sample] = []
    joined_steps: list[tuple[list[int], float, int]] = []
    mixed = multi = 0
    for i, rec in enumerate(records):
        calls = rec["calls"]
        if len(calls) != 1:
            multi += 1
            continue
        call, ms = calls[0], float(rec["ms"])
        if call["kind"] == "decode":
            ctx = [int(c) for c in call["ctx"]]
            joins = _joins_after(rec, records[i + 1] if i + 1 < len(records) else None) if split_joins else 0
            if joins:
                joined_steps.append((ctx, ms, joins))
            else:
                decode.append((ctx, ms))
        elif all(int(s) == 0 for s, _ in call["chunks"]):
            prefill.append(([int(e) for _, e in call["chunks"]], ms))
        else:
            mixed += 1
    return ServedSamples(prefill=prefill, decode=decode, mixed=mixed, multi=multi, decode_joined=joined_steps)


def _join_ms(joined: Sequence[tuple[list[int], float, int]], coeffs: LatencyCoeffs, buckets: ShapeBuckets | None) -> float:
    """Landing time per joining request: sum(step ms - predicted step ms) / sum(joins) over the
    steps followed by joins (stalls over STALL_FACTOR x the prediction dropped); >= 0."""
    lat = LatencyModel(coeffs=coeffs, buckets=buckets)
    excess = n = 0.0
    for ctx, ms, joins in joined:
        pred = decode_sample_ms(lat, ctx)
        if ms <= STALL_FACTOR * (pred + 10.0 * joins):
            excess += ms - pred
            n += joins
    return max(0.0, excess / n) if n else 0.0


def _by_shape(samples: Sequence[Sample], row, buckets: ShapeBuckets | None) -> dict[tuple[float, ...], list[Sample]]:
    """Samples grouped by their feature row (with padded buckets: one group per program shape)."""
    groups: dict[tuple[float, ...], list[Sample]] = defaultdict(list)
    for lens, ms in samples:
        groups[tuple(round(x, 6) for x in row(lens, buckets))].append((lens, ms))
    return groups


def _trimmed_mean(times: Sequence[float], med: float) -> float:
    """The mean of `times` without those over STALL_FACTOR x their median `med` (compilations)."""
    return statistics.fmean(t for t in times if t <= STALL_FACTOR * med)


def _grouped(groups: Mapping[tuple[float, ...], list[Sample]], min_group: int) -> list[Sample]:
    """One (lengths, trimmed mean ms) per feature row seen at least `min_group` times."""
    out = []
    for members in groups.values():
        if len(members) < min_group:
            continue
        med = statistics.median(ms for _, ms in members)
        lens = min(members, key=lambda s: abs(s[1] - med))[0]  # a member with the median time
        out.append((lens, _trimmed_mean([ms for _, ms in members], med)))
    return out


def _measured_table(groups: Mapping[tuple[float, ...], list[Sample]], buckets: ShapeBuckets | None, min_records: int,
                    *, decode: bool) -> tuple[tuple[float, float, float], ...]:
    """(feature 1, feature 2, trimmed mean ms) per padded shape seen at least `min_records` times,
    in LatencyCoeffs' table layout: (sum_len, sum_len_sq) for prefill, (batch, sum_ctx_plus_1) for
    decode (whose feature rows are [1, sum_ctx_plus_1, batch]). Only with padded features
    (`buckets`): without them no two batches share a shape."""
    if buckets is None:
        return ()
    table = []
    for (_, f_a, f_b), members in groups.items():
        if len(members) < min_records:
            continue
        times = [ms for _, ms in members]
        f1, f2 = (f_b, f_a) if decode else (f_a, f_b)
        table.append((f1, f2, _trimmed_mean(times, statistics.median(times))))
    return tuple(sorted(table))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServedFit:
    coeffs: LatencyCoeffs
    prefill_groups: int
    decode_groups: int
    samples: ServedSamples
    # median |relative error| of the fit over the group medians, per kind
    prefill_median_rel_err: float
    decode_median_rel_err: float
    scaled: tuple[str, ...] = ()  # kinds with < 3 shapes: the base form scaled, not fitted
    decode_join_ms: float = 0.0  # landing a joining request's KV (split_joins fits only)


def _scaled(base: LatencyCoeffs, samples: Sequence[Sample], *, prefill: bool, buckets: ShapeBuckets | None):
    """The base form times the median ratio served / base over `samples` (one fitted number)."""
    lat = LatencyModel(coeffs=base, buckets=buckets)
    predict = prefill_sample_ms if prefill else decode_sample_ms
    pred = [predict(lat, lens) for lens, _ in samples]
    ratio = statistics.median(ms / p for (_, ms), p in zip(samples, pred) if p > 0)
    if prefill:
        return tuple(x * ratio for x in base.prefill)
    return tuple(x * ratio for x in base.decode_small), tuple(x * ratio for x in base.decode_large)


def fit_served(
    records: Iterable[Mapping[str, Any]],
    *,
    buckets: ShapeBuckets | None,
    min_group: int = 3,
    large_bs_threshold: int = DEFAULT_LARGE_BS_THRESHOLD,
    base: LatencyCoeffs | None = None,
    table_min_records: int | None = TABLE_MIN_RECORDS,
    split_joins: bool = False,
) -> ServedFit:
    """Fit one (model, TP) entry on served step records (see the module docstring).

    A workload can touch fewer than 3 padded shapes of a kind (LongBench-shaped prompts: every
    prefill alone, T_pad 512). With `base` (the runner profile's coefficients) such a kind keeps
    the base form scaled by the median served / base ratio over its shapes (`scaled` in the fit's
    metadata); without it, or with no shape at all, it is an error."""
    if min_group < 1:
        raise ValueError(f"min_group={min_group} must be >= 1")
    samples = served_samples(records, split_joins=split_joins)
    pre_groups = _by_shape(samples.prefill, prefill_row, buckets)
    dec_groups = _by_shape(samples.decode, decode_row, buckets)
    pre, dec = _grouped(pre_groups, min_group), _grouped(dec_groups, min_group)
    short = [k for k, g in (("prefill", pre), ("decode", dec)) if len(g) < 3]
    if short and (base is None or not pre or not dec):
        raise ValueError(
            f"served steps give {len(pre)} prefill and {len(dec)} decode shapes with >= {min_group} records each "
            f"(from {len(samples.prefill)} prefill and {len(samples.decode)} decode steps); need 3 of each"
            + (" (or >= 1 of each and a base profile to scale)" if base is None else "")
            + ": log a longer or more varied run"
        )
    if not short:
        coeffs = fit_profile(prefill=pre, decode=dec, buckets=buckets, large_bs_threshold=large_bs_threshold)
    else:
        if len(dec) >= 3:
            d = fit_decode(dec, buckets)
            small = large = d
        else:
            small, large = _scaled(base, dec, prefill=False, buckets=buckets)
        coeffs = LatencyCoeffs(
            prefill=fit_prefill(pre, buckets) if len(pre) >= 3 else _scaled(base, pre, prefill=True, buckets=buckets),
            decode_small=small, decode_large=large, large_bs_threshold=large_bs_threshold)
    ep, ed = relative_errors(coeffs, prefill=pre, decode=dec, buckets=buckets)  # of the forms alone
    if table_min_records is not None:
        coeffs = dataclasses.replace(
            coeffs,
            prefill_table=_measured_table(pre_groups, buckets, table_min_records, decode=False),
            decode_table=_measured_table(dec_groups, buckets, table_min_records, decode=True))
    join_ms = _join_ms(samples.decode_joined, coeffs, buckets) if split_joins else 0.0
    return ServedFit(coeffs=coeffs, prefill_groups=len(pre), decode_groups=len(dec), samples=samples,
                     prefill_median_rel_err=float(statistics.median(abs(ep))),
                     decode_median_rel_err=float(statistics.median(abs(ed))), scaled=tuple(short),
                     decode_join_ms=join_ms)


def served_profile(base: Profile, model: str, tp: int, fit: ServedFit, *, logs: Sequence[str] = (),
                   buckets: ShapeBuckets | None = None) -> Profile:
    """`base` with the (model, tp) entry replaced by the served fit; metadata says where it came
    from. `buckets`: the shape buckets the fit used, when not the base profile's."""
    meta = dict(base.metadata)
    if buckets is not None:
        meta["shape_buckets"] = buckets.to_json()
    meta.update({
        "source": "dsjax.planner.served (served step logs)",
        "base_profile": base.source or meta.get("source", ""),
        "step_logs": list(logs),
        "served_fit": {
            "prefill_steps": len(fit.samples.prefill), "decode_steps": len(fit.samples.decode),
            "mixed_steps": fit.samples.mixed, "multi_call_steps": fit.samples.multi,
            "prefill_shapes": fit.prefill_groups, "decode_shapes": fit.decode_groups,
            "prefill_median_rel_err": round(fit.prefill_median_rel_err, 4),
            "decode_median_rel_err": round(fit.decode_median_rel_err, 4),
            "scaled": list(fit.scaled),
            "decode_join_ms": round(fit.decode_join_ms, 4),
            "decode_joined_steps": len(fit.samples.decode_joined),
        },
        "timing": "served steps: engine loop step() plus the command drain and timers after it (serving/step_log.py), "
                  "median per padded shape",
    })
    return with_entry(base, model, tp, fit.coeffs, metadata=meta, source="served")


def with_entry(base: Profile, model: str, tp: int, coeffs: LatencyCoeffs, *, metadata: Mapping[str, Any] | None = None,
               source: str | None = None) -> Profile:
    """`base` with its (model, tp) entry replaced by `coeffs` (and its metadata, if given)."""
    entries = {m: dict(by_tp) for m, by_tp in base.entries.items()}
    key = next((m for m in entries if canonical_model_name(m) == canonical_model_name(model)), model)
    entries.setdefault(key, {})[tp] = coeffs
    return Profile(entries=entries, metadata=dict(base.metadata if metadata is None else metadata),
                   source=base.source if source is None else source)


def fit_served_best(records: Sequence[Mapping[str, Any]], *, block_size: int,
                    kinds: Sequence[str] = ("padded", "dense"), min_group: int = 3,
                    base: LatencyCoeffs | None = None, split_joins: bool = False) -> tuple[ServedFit, ShapeBuckets]:
    """The fit, over the bucket kinds `kinds` (buckets.py), with the lowest median relative error
    (prefill + decode): which padded-shape features the served steps follow. On this engine's XLA
    path a prefill batch of several prompts costs ~B_pad times one prompt of the same T_pad
    (every padded request scores min(T, S) queries against S keys), which "dense" models."""
    best = None
    for kind in kinds:
        buckets = ShapeBuckets(block_size=block_size, attention=kind)
        fit = fit_served(records, buckets=buckets, min_group=min_group, base=base, split_joins=split_joins)
        err = fit.prefill_median_rel_err + fit.decode_median_rel_err
        if best is None or err < best[0]:
            best = (err, fit, buckets)
    return best[1], best[2]


# ---- speed factors: the same shapes, a faster or slower machine ------------------------------
#
# On a shared CPU host the cost of one program shape drifts by 10-50% over minutes (what else runs
# on the other core, frequency, cache). A fit over a long warm-up keeps the *shape dependence*
# right but not the *level* at a given moment. `speed_factors` measures the level over a window of
# step records as one ratio per kind, sum(served ms) / sum(fitted ms) over the window's single-call
# steps (a ratio of sums: TPOT averages step times, so long steps weigh by their length), after
# dropping steps over STALL_FACTOR x their prediction (compilations). `scale_coeffs` applies it.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedFactors:
    prefill: float
    decode: float
    prefill_steps: int  # single-call steps the ratio is over
    decode_steps: int


def speed_factors(records: Iterable[Mapping[str, Any]], coeffs: LatencyCoeffs, *, buckets: ShapeBuckets | None,
                  min_steps: int = 20, join_ms: float | None = None) -> SpeedFactors:
    """Served / fitted time ratio per kind over `records`. A kind with fewer than `min_steps` usable
    steps takes the other kind's ratio (1.0 when neither has enough). With `join_ms` (a fit that
    split the joins out) a decode step followed by j joins is predicted as the step + j x join_ms."""
    lat = LatencyModel(coeffs=coeffs, buckets=buckets)
    samples = served_samples(records, split_joins=join_ms is not None)

    def ratio(pairs: list[tuple[float, float]]) -> tuple[float | None, int]:
        kept = [(ms, p) for ms, p in pairs if p > 0 and ms <= STALL_FACTOR * p]
        if len(kept) < min_steps:
            return None, len(kept)
        return sum(ms for ms, _ in kept) / sum(p for _, p in kept), len(kept)

    pre = [(ms, prefill_sample_ms(lat, lens)) for lens, ms in samples.prefill]
    dec = [(ms, decode_sample_ms(lat, ctx)) for ctx, ms in samples.decode]
    dec += [(ms, decode_sample_ms(lat, ctx) + j * (join_ms or 0.0)) for ctx, ms, j in samples.decode_joined]
    fp, n_p = ratio(pre)
    fd, n_d = ratio(dec)
    fp = fp if fp is not None else (fd if fd is not None else 1.0)
    fd = fd if fd is not None else fp
    return SpeedFactors(prefill=fp, decode=fd, prefill_steps=n_p, decode_steps=n_d)


def scale_coeffs(coeffs: LatencyCoeffs, factors: SpeedFactors) -> LatencyCoeffs:
    """`coeffs` with every prefill term times factors.prefill and every decode term times
    factors.decode (the same shapes on a uniformly faster or slower machine)."""
    if not (factors.prefill > 0 and factors.decode > 0):
        raise ValueError(f"speed factors must be > 0, got {factors}")
    return dataclasses.replace(
        coeffs,
        prefill=tuple(x * factors.prefill for x in coeffs.prefill),
        decode_small=tuple(x * factors.decode for x in coeffs.decode_small),
        decode_large=tuple(x * factors.decode for x in coeffs.decode_large),
        prefill_table=tuple((f1, f2, ms * factors.prefill) for f1, f2, ms in coeffs.prefill_table),
        decode_table=tuple((f1, f2, ms * factors.decode) for f1, f2, ms in coeffs.decode_table),
    )
