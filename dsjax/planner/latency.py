"""Latency model: DistServe's fitted per-(model, TP) forms, in milliseconds.

    prefill(batch) = a + b * sum(len) + c * sum(len^2)
    decode(batch)  = a + b * sum(ctx_len + 1) + c * batch_size

with `decoding_smallbs` coefficients below `decoding_large_small_bs_threshold` requests and
`decoding_largebs` at or above it. With pipeline parallelism of degree pp > 1 every stage costs
prefill/pp + pp_overhead_ms * pp (DistServe's public simulator: prefill/pp + pp) and decode/pp.

Profile files use DistServe's schema, keyed by model name ("facebook/opt-13b") then TP as a string:

    {"facebook/opt-13b": {"1": {"prefill": [a, b, c], "decoding_smallbs": [...],
                                "decoding_largebs": [...], "decoding_large_small_bs_threshold": 95}},
     "metadata": {"device": "...", "dtype": "...", "date": "..."}}      # optional, ours

`fitting.fit_profile` fits the coefficient triples from measured samples by least squares on relative
error, so the engine's profiler (profiler.py) writes a profile in the same schema with `save_profile`.

Shape buckets (buckets.py, off unless a profile's metadata has "shape_buckets"): our engine runs
padded programs (dsjax/engine/shapes.py), so its step time is that of the padded shape. With buckets the
features above are computed on the padded shape (`ShapeBuckets` says how) both when fitting and
when predicting; DistServe's profiles have none and keep the plain forms.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from dsjax.engine import shapes
from dsjax.planner.buckets import ShapeBuckets
from dsjax.planner.model_spec import canonical_model_name

Coeffs = tuple[float, float, float]
DEFAULT_LARGE_BS_THRESHOLD = 95


def _triple(name: str, value: Any) -> Coeffs:
    try:
        a, b, c = (float(x) for x in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={value!r} must be three numbers [a, b, c]") from e
    return (a, b, c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatencyCoeffs:
    """Fitted coefficients of one (model, TP) pair; all times in milliseconds."""

    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    large_bs_threshold: int = DEFAULT_LARGE_BS_THRESHOLD
    # Measured times of the engine's padded program shapes (served fits, served.py), as
    # (feature 1, feature 2, ms) rows keyed by the same features the forms take: (sum_len,
    # sum_len_sq) for prefill, (batch, sum_ctx_plus_1) for decode, both on the padded shape. A
    # shape listed here costs its measured time; any other shape follows the fitted form.
    prefill_table: tuple[tuple[float, float, float], ...] = ()
    decode_table: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("prefill", "decode_small", "decode_large"):
            object.__setattr__(self, name, _triple(name, getattr(self, name)))
        if self.large_bs_threshold < 1:
            raise ValueError(f"large_bs_threshold={self.large_bs_threshold} must be >= 1")
        for name in ("prefill_table", "decode_table"):
            rows = tuple(_triple(f"{name} row", r) for r in getattr(self, name))
            if any(not ms > 0 for _, _, ms in rows):
                raise ValueError(f"{name} times must be > 0 ms, got {[r[2] for r in rows if not r[2] > 0]}")
            object.__setattr__(self, name, rows)
        object.__setattr__(self, "_prefill_lookup", {_key(f1, f2): ms for f1, f2, ms in self.prefill_table})
        object.__setattr__(self, "_decode_lookup", {_key(f1, f2): ms for f1, f2, ms in self.decode_table})

    def without_tables(self) -> "LatencyCoeffs":
        return dataclasses.replace(self, prefill_table=(), decode_table=())

    def prefill_ms(self, sum_len: float, sum_len_sq: float) -> float:
        """One prefill batch on the whole model (no pipeline split)."""
        measured = self._prefill_lookup.get(_key(sum_len, sum_len_sq)) if self.prefill_table else None
        if measured is not None:
            return measured
        a, b, c = self.prefill
        return a + b * sum_len + c * sum_len_sq

    def decode_coeffs(self, batch_size: int) -> Coeffs:
        return self.decode_small if batch_size < self.large_bs_threshold else self.decode_large

    def decode_ms(self, batch_size: int, sum_ctx_plus_1: float) -> float:
        """One decode step of `batch_size` requests whose (ctx_len + 1) sum to `sum_ctx_plus_1`."""
        measured = self._decode_lookup.get(_key(batch_size, sum_ctx_plus_1)) if self.decode_table else None
        if measured is not None:
            return measured
        a, b, c = self.decode_coeffs(batch_size)
        return a + b * sum_ctx_plus_1 + c * batch_size

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "decoding_large_small_bs_threshold": self.large_bs_threshold,
            "prefill": list(self.prefill),
            "decoding_smallbs": list(self.decode_small),
            "decoding_largebs": list(self.decode_large),
        }
        if self.prefill_table or self.decode_table:  # ours; DistServe's readers ignore it
            doc["measured_shapes"] = {"prefill": [list(r) for r in self.prefill_table],
                                      "decode": [list(r) for r in self.decode_table]}
        return doc

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, where: str = "") -> "LatencyCoeffs":
        missing = {"prefill", "decoding_smallbs", "decoding_largebs"} - set(d)
        if missing:
            raise ValueError(f"profile entry {where} lacks {sorted(missing)}")
        return cls(
            prefill=d["prefill"],
            decode_small=d["decoding_smallbs"],
            decode_large=d["decoding_largebs"],
            large_bs_threshold=int(d.get("decoding_large_small_bs_threshold", DEFAULT_LARGE_BS_THRESHOLD)),
            prefill_table=tuple(d.get("measured_shapes", {}).get("prefill", ())),
            decode_table=tuple(d.get("measured_shapes", {}).get("decode", ())),
        )


def _key(f1: float, f2: float) -> tuple[float, float]:
    """Lookup key of a feature pair (padded shapes give integers; rounding absorbs float noise)."""
    return (round(float(f1), 6), round(float(f2), 6))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatencyModel:
    """Latency of one instance: coefficients of its TP degree, split over `pp` pipeline stages.

    With `buckets` every prefill and decode is costed at the engine's padded shape; callers then
    pass the batch's request count and longest length (the defaults assume a uniform batch).
    """

    coeffs: LatencyCoeffs
    tp: int = 1
    pp: int = 1
    pp_overhead_ms: float = 1.0  # charged pp times per stage when pp > 1 (DistServe: "+ pp")
    buckets: ShapeBuckets | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp={self.tp} and pp={self.pp} must be >= 1")

    @property
    def needs_max_context(self) -> bool:
        """Whether decode cost depends on the longest context (padded or dense buckets)."""
        return self.buckets is not None and self.buckets.decode_pads_context

    def prefill_ms(self, sum_len: float, sum_len_sq: float, num_seqs: int = 1, max_len: float | None = None) -> float:
        """One prefill batch on the whole model (no pipeline split)."""
        if self.buckets is not None:
            sum_len, sum_len_sq = self.buckets.prefill_features(
                sum_len, sum_len_sq, num_seqs, sum_len / max(num_seqs, 1) if max_len is None else max_len
            )
        return self.coeffs.prefill_ms(sum_len, sum_len_sq)

    def prefill_stage_s(self, sum_len: float, sum_len_sq: float, num_seqs: int = 1, max_len: float | None = None) -> float:
        """Time one pipeline stage is busy with a prefill batch (the whole model when pp == 1)."""
        ms = self.prefill_ms(sum_len, sum_len_sq, num_seqs, max_len)
        if self.pp > 1:
            ms = ms / self.pp + self.pp_overhead_ms * self.pp
        return ms * 1e-3

    def prefill_s(self, sum_len: float, sum_len_sq: float, num_seqs: int = 1, max_len: float | None = None) -> float:
        """End-to-end latency of a prefill batch through all stages of an otherwise idle pipeline."""
        return self.pp * self.prefill_stage_s(sum_len, sum_len_sq, num_seqs, max_len)

    def _decode_ms(self, batch_size: int, sum_ctx_plus_1: float, max_ctx_plus_1: float | None) -> float:
        if self.buckets is not None:
            mx = sum_ctx_plus_1 / batch_size if max_ctx_plus_1 is None else max_ctx_plus_1
            batch_size, sum_ctx_plus_1 = self.buckets.decode_features(batch_size, sum_ctx_plus_1, mx)
        return self.coeffs.decode_ms(batch_size, sum_ctx_plus_1)

    def _micro_batch(self, batch_size: int) -> int:
        return batch_size if self.pp == 1 else -(-batch_size // self.pp)

    def decode_step_s(self, batch_size: int, sum_ctx_plus_1: float, max_ctx_plus_1: float | None = None) -> float:
        """Time for every running request to gain one token.

        With pp > 1 the batch is split into pp micro-batches of ceil(B/pp) requests that flow through
        the pipeline back to back; a stage spends decode(mb)/pp per micro-batch, so each request waits
        pp of those: decode(mb) in total. (For B < pp the pipeline is partly empty and the step is just
        the full-model latency of a batch of one.)
        """
        if batch_size <= 0:
            return 0.0
        mb = self._micro_batch(batch_size)
        return self._decode_ms(mb, sum_ctx_plus_1 * mb / batch_size, max_ctx_plus_1) * 1e-3

    def decode_linear_s(self, batch_size: int, sum_ctx_plus_1: float, max_ctx_plus_1: float | None = None) -> tuple[float, float]:
        """(first step time, growth per step) in seconds for a batch whose composition stays fixed.

        Every step each request's context grows by one, so sum(ctx+1) grows by B per step and the
        step time grows linearly: step_j = alpha + beta * j. The simulator uses this to jump over
        many decode steps at once. With padded or dense buckets the step costs the padded width,
        constant until `decode_steps_to_reshape` steps (growth 0).
        """
        if batch_size <= 0:
            return 0.0, 0.0
        step = self.decode_step_s(batch_size, sum_ctx_plus_1, max_ctx_plus_1)
        if self.needs_max_context:
            return step, 0.0
        mb = self._micro_batch(batch_size)
        if self.buckets is not None:
            mb = self.buckets.decode_features(mb, 0.0, 1)[0]  # regime of the padded batch
        b = self.coeffs.decode_coeffs(mb)[1]
        return step, b * self._micro_batch(batch_size) * 1e-3

    def decode_steps_to_reshape(self, max_ctx_plus_1: int) -> int | None:
        """Steps until the decode program's padded context width changes (None: never matters)."""
        return self.buckets.steps_to_reshape(max_ctx_plus_1) if self.needs_max_context else None

    def mixed_step_s(self, chunk_tokens: int, chunk_quad: float, batch_size: int, sum_ctx_plus_1: float,
                     *, num_chunks: int = 1, chunk_max_keys: float | None = None,
                     decode_max_keys: float | None = None, fused: bool = True) -> float:
        """One chunked-prefill step: prefill chunks plus `batch_size` decodes.

        fused (one forward pass, Sarathi): the prefill form covers the chunks (a chunk of c tokens
        after p cached ones contributes c * (2p + c) to the quadratic term, so the chunks of one
        prompt add up to len^2); the decodes add their marginal cost b * sum(ctx + 1) + c * batch,
        without a second fixed cost. With pp > 1 the step crosses every stage, pp * (pp_overhead_ms)
        extra, with no overlap between steps. Not fused (our engine on the XLA path: the decode
        program then the prefill program, dispatched back to back): the sum of a decode step and a
        prefill of the chunks, each with its fixed cost and padded shape.

        With padded or dense shape buckets and the longest key counts (`chunk_max_keys`: the
        chunks' ends, `decode_max_keys`: the decodes' ctx + 1) the engine's split mixed program is
        costed (models/attention.py, "mixed batches"): the decode rows form a decode region of
        B_pad = next_pow2(batch, 2) rows attending S_pad keys, the chunks a prefill region of
        T_pad = next_pow2(chunk tokens, 16) rows, with S_pad the shared block-table width:

            a_p + b_p T_pad + c_p T_pad S_pad  +  b_d B_pad S_pad + c_d B_pad
        """
        if not fused:
            ms = 1e3 * self.prefill_s(chunk_tokens, chunk_quad, num_chunks, chunk_max_keys) if chunk_tokens else 0.0
            if batch_size:
                ms += 1e3 * self.decode_step_s(batch_size, sum_ctx_plus_1, decode_max_keys)
            return ms * 1e-3
        keys = [k for k in (chunk_max_keys, decode_max_keys) if k is not None]
        max_keys = max(keys) if keys else None
        cb = self.buckets
        if cb is not None and cb.decode_pads_context and max_keys is not None and chunk_tokens:
            s_pad = cb.padded_keys(max_keys)
            t_pad = shapes.next_pow2(chunk_tokens, 16)
            a, b, c = self.coeffs.prefill
            quad = t_pad * s_pad * (shapes.next_pow2(max(num_chunks, 1)) if cb.attention == "dense" else 1)
            ms = a + b * t_pad + c * quad
            if batch_size:
                b_pad = shapes.next_pow2(batch_size, 2)
                _, bd, cd = self.coeffs.decode_coeffs(b_pad)
                ms += bd * b_pad * s_pad + cd * b_pad
        else:
            ms = self.coeffs.prefill_ms(chunk_tokens, chunk_quad) if chunk_tokens else self.coeffs.decode_coeffs(batch_size)[0]
            if batch_size:
                _, b, c = self.coeffs.decode_coeffs(batch_size)
                ms += b * sum_ctx_plus_1 + c * batch_size
        if self.pp > 1:
            ms += self.pp_overhead_ms * self.pp * self.pp
        return ms * 1e-3

    def saturating_prefill_tokens(self, efficiency: float = 0.9) -> int:
        """L_m: the smallest batch token count whose prefill throughput reaches `efficiency` of the
        asymptotic (fixed cost amortised) throughput 1/b, ignoring the quadratic term:
        L / (a + b L) >= efficiency / b  <=>  L >= efficiency * a / ((1 - efficiency) * b).
        With buckets it is rounded down to a bucket size (a batch just past a bucket pays for the
        next one)."""
        if not 0 < efficiency < 1:
            raise ValueError(f"efficiency={efficiency} must be in (0, 1)")
        a, b, _ = self.coeffs.prefill
        if b <= 0 or a <= 0:
            return 2048
        tokens = int(round(efficiency * a / ((1 - efficiency) * b)))
        if self.buckets is not None:
            tokens = max(16, 1 << (max(tokens, 1).bit_length() - 1))
        return tokens


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Profile:
    """Coefficients per model name (canonical, e.g. "facebook/opt-13b") and TP degree."""

    entries: Mapping[str, Mapping[int, LatencyCoeffs]]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def _entry(self, model: str) -> Mapping[int, LatencyCoeffs]:
        for key in (model, canonical_model_name(model)):
            if key in self.entries:
                return self.entries[key]
        raise ValueError(f"profile {self.source or '<memory>'} has no model {model!r}; it has {sorted(self.entries)}")

    def tp_degrees(self, model: str) -> tuple[int, ...]:
        return tuple(sorted(self._entry(model)))

    def has(self, model: str, tp: int) -> bool:
        try:
            return tp in self._entry(model)
        except ValueError:
            return False

    def coeffs(self, model: str, tp: int) -> LatencyCoeffs:
        entry = self._entry(model)
        if tp not in entry:
            raise ValueError(f"profile {self.source or '<memory>'} has no tp={tp} for {model!r}; it has tp in {sorted(entry)}")
        return entry[tp]

    @property
    def buckets(self) -> ShapeBuckets | None:
        """The engine's shape buckets the coefficients were fitted on (metadata "shape_buckets")."""
        d = self.metadata.get("shape_buckets")
        return ShapeBuckets.from_json(d) if isinstance(d, Mapping) else None

    def latency(self, model: str, *, tp: int, pp: int = 1, pp_overhead_ms: float = 1.0, use_buckets: bool = True) -> LatencyModel:
        """The instance latency model; `use_buckets=False` ignores the profile's shape buckets."""
        return LatencyModel(
            coeffs=self.coeffs(model, tp), tp=tp, pp=pp, pp_overhead_ms=pp_overhead_ms,
            buckets=self.buckets if use_buckets else None,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            model: {str(tp): c.to_json() for tp, c in sorted(by_tp.items())} for model, by_tp in self.entries.items()
        }
        if self.metadata:
            doc["metadata"] = dict(self.metadata)
        return doc


def profile_from_json(doc: Mapping[str, Any], *, source: str = "") -> Profile:
    """Parse DistServe's schema; a top-level "metadata" object is kept aside, not read as a model."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"profile {source} must be a JSON object, got {type(doc).__name__}")
    entries: dict[str, dict[int, LatencyCoeffs]] = {}
    for model, by_tp in doc.items():
        if model == "metadata":
            continue
        if not isinstance(by_tp, Mapping):
            raise ValueError(f"profile {source}: {model!r} must map TP degrees to coefficients")
        entries[model] = {}
        for tp_key, d in by_tp.items():
            try:
                tp = int(tp_key)
            except ValueError as e:
                raise ValueError(f"profile {source}: {model!r} has non-integer TP key {tp_key!r}") from e
            entries[model][tp] = LatencyCoeffs.from_json(d, where=f"{source}:{model}:{tp_key}")
    meta = doc.get("metadata", {})
    profile = Profile(entries=entries, metadata=dict(meta) if isinstance(meta, Mapping) else {}, source=source)
    try:
        profile.buckets  # validate early, naming the file
    except ValueError as e:
        raise ValueError(f"profile {source}: {e}") from e
    return profile


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"profile file {str(p)!r} does not exist")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"profile file {str(p)!r} is not JSON: {e}") from e
    return profile_from_json(doc, source=str(p))


def save_profile(path: str | Path, profile: Profile) -> None:
    """Write `profile` in DistServe's schema plus our optional "metadata" object."""
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")
