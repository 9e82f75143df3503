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
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.models import canonical_model_name
from dsjax.planner.latency import (
    DEFAULT_LARGE_BS_THRESHOLD,
    LatencyCoeffs,
    LatencyModel,
    Profile,
    _decode_row,
    _prefill_row,
    fit_decode,
    fit_prefill,
    fit_profile,
    relative_errors,
)

Sample = tuple[list[int], float]
STALL_FACTOR = 5.0  # a step over 5x its shape's median time is a compilation, not a served cost


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServedSamples:
    """Single-call served steps, by kind; `mixed` and `multi` are only counted."""

    prefill: list[Sample]
    decode: list[Sample]
    mixed: int = 0
    multi: int = 0


def served_samples(records: Iterable[Mapping[str, Any]]) -> ServedSamples:
    prefill: list[Sample] = []
    decode: list[Sample] = []
    mixed = multi = 0
    for rec in records:
        calls = rec["calls"]
        if len(calls) != 1:
            multi += 1
            continue
        call, ms = calls[0], float(rec["ms"])
        if call["kind"] == "decode":
            decode.append(([int(c) for c in call["ctx"]], ms))
        elif all(int(s) == 0 for s, _ in call["chunks"]):
            prefill.append(([int(e) for _, e in call["chunks"]], ms))
        else:
            mixed += 1
    return ServedSamples(prefill=prefill, decode=decode, mixed=mixed, multi=multi)


def _grouped(samples: Sequence[Sample], row, buckets: ShapeBuckets | None, min_group: int) -> list[Sample]:
    """One (lengths, median ms) per feature row seen at least `min_group` times."""
    groups: dict[tuple, list[Sample]] = defaultdict(list)
    for lens, ms in samples:
        key = tuple(round(x, 6) for x in row(lens, buckets))
        groups[key].append((lens, ms))
    out = []
    for members in groups.values():
        if len(members) < min_group:
            continue
        med = statistics.median(ms for _, ms in members)
        kept = [ms for _, ms in members if ms <= STALL_FACTOR * med]
        lens = min(members, key=lambda s: abs(s[1] - med))[0]  # a member with the median time
        out.append((lens, statistics.fmean(kept)))
    return out


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


def _scaled(base: LatencyCoeffs, samples: Sequence[Sample], *, prefill: bool, buckets: ShapeBuckets | None):
    """The base form times the median ratio served / base over `samples` (one fitted number)."""
    lat = LatencyModel(coeffs=base, buckets=buckets)
    if prefill:
        pred = [lat.prefill_ms(sum(l), sum(x * x for x in l), len(l), max(l)) for l, _ in samples]
    else:
        pred = [lat.decode_step_s(len(c), sum(x + 1 for x in c), max(c) + 1) * 1e3 for c, _ in samples]
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
) -> ServedFit:
    """Fit one (model, TP) entry on served step records (see the module docstring).

    A workload can touch fewer than 3 padded shapes of a kind (LongBench-shaped prompts: every
    prefill alone, T_pad 512). With `base` (the runner profile's coefficients) such a kind keeps
    the base form scaled by the median served / base ratio over its shapes (`scaled` in the fit's
    metadata); without it, or with no shape at all, it is an error."""
    if min_group < 1:
        raise ValueError(f"min_group={min_group} must be >= 1")
    samples = served_samples(records)
    pre = _grouped(samples.prefill, _prefill_row, buckets, min_group)
    dec = _grouped(samples.decode, _decode_row, buckets, min_group)
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
    ep, ed = relative_errors(coeffs, prefill=pre, decode=dec, buckets=buckets)
    return ServedFit(coeffs=coeffs, prefill_groups=len(pre), decode_groups=len(dec), samples=samples,
                     prefill_median_rel_err=float(statistics.median(abs(ep))),
                     decode_median_rel_err=float(statistics.median(abs(ed))), scaled=tuple(short))


def served_profile(base: Profile, model: str, tp: int, fit: ServedFit, *, logs: Sequence[str] = (),
                   buckets: ShapeBuckets | None = None) -> Profile:
    """`base` with the (model, tp) entry replaced by the served fit; metadata says where it came
    from. `buckets`: the shape buckets the fit used, when not the base profile's."""
    entries = {m: dict(by_tp) for m, by_tp in base.entries.items()}
    key = next((m for m in entries if canonical_model_name(m) == canonical_model_name(model)), model)
    entries.setdefault(key, {})[tp] = fit.coeffs
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
        },
        "timing": "served steps: engine loop step() plus the command drain and timers after it (serving/step_log.py), "
                  "median per padded shape",
    })
    return Profile(entries=entries, metadata=meta, source="served")


def fit_served_best(records: Sequence[Mapping[str, Any]], *, block_size: int,
                    kinds: Sequence[str] = ("padded", "dense"), min_group: int = 3,
                    base: LatencyCoeffs | None = None) -> tuple[ServedFit, ShapeBuckets]:
    """The fit, over the bucket kinds `kinds` (buckets.py), with the lowest median relative error
    (prefill + decode): which padded-shape features the served steps follow. On this engine's XLA
    path a prefill batch of several prompts costs ~B_pad times one prompt of the same T_pad
    (every padded request scores min(T, S) queries against S keys), which "dense" models."""
    best = None
    for kind in kinds:
        buckets = ShapeBuckets(block_size=block_size, attention=kind)
        fit = fit_served(records, buckets=buckets, min_group=min_group, base=base)
        err = fit.prefill_median_rel_err + fit.decode_median_rel_err
        if best is None or err < best[0]:
            best = (err, fit, buckets)
    return best[1], best[2]
