"""The stated SLO rule and the regime a run sits in, both read off the run's latency profile.

SLOs: TTFT = 3.5 x the isolated 512-token prefill, TPOT = 5 x the isolated decode step at batch 1
with 512 tokens of context (DistServe's rule of thumb, scaled to whatever device was profiled).
"""

from __future__ import annotations

from typing import Any

from dsjax.bench.analysis import SLOs

TTFT_PREFILL_FACTOR = 3.5
TPOT_DECODE_FACTOR = 5.0


def derive_slos(metadata: dict, target: float = 0.9) -> tuple[SLOs, dict]:
    """TTFT = 3.5 x prefill_512_ms, TPOT = 5 x decode_bs1_ctx512_ms (profile metadata)."""
    missing = [k for k in ("prefill_512_ms", "decode_bs1_ctx512_ms") if k not in metadata]
    if missing:
        raise ValueError(f"profile metadata lacks {missing}: profile with isolated measurements (python -m dsjax.plan profile)")
    prefill_ms, decode_ms = float(metadata["prefill_512_ms"]), float(metadata["decode_bs1_ctx512_ms"])
    slos = SLOs(ttft_s=TTFT_PREFILL_FACTOR * prefill_ms / 1e3, tpot_s=TPOT_DECODE_FACTOR * decode_ms / 1e3, target=target)
    how = {"prefill_512_ms": prefill_ms, "decode_bs1_ctx512_ms": decode_ms,
           "rule": f"TTFT = {TTFT_PREFILL_FACTOR} x prefill_512_ms, TPOT = {TPOT_DECODE_FACTOR} x decode_bs1_ctx512_ms"}
    return slos, how


def regime_numbers(profile, model: str) -> dict[str, Any]:
    """Where the run sits between a compute-bound and a bandwidth-bound decode: the isolated
    512-token prefill over the batch-1 decode step (OPT-13B on an A100: 72 / 20 ms = 3.6) and the
    fitted decode step at batch 1, 8 and 32 with 512 tokens of context each (flat in the batch:
    bound by bandwidth; growing with it: bound by compute)."""
    meta = dict(profile.metadata)
    fitted = regime_row(model, profile, model)["decode_ms"]
    prefill_ms, decode_ms = float(meta["prefill_512_ms"]), float(meta["decode_bs1_ctx512_ms"])
    return {"prefill_512_ms": prefill_ms, "decode_bs1_ctx512_ms": decode_ms, "prefill_over_decode": prefill_ms / decode_ms,
            "decode_step_ms_ctx512": {str(b): fitted[b] for b in (1, 8, 32)},
            "a100_opt13b_prefill_over_decode": 72 / 20}


REGIME_BATCHES = (1, 2, 4, 8, 16, 32)


def regime_row(label: str, profile, model: str) -> dict[str, Any]:
    """One profile's regime from its fitted latency model (so measured and published profiles,
    e.g. DistServe's A100 one, are read the same way): the 512-token prefill, the decode step at
    each of REGIME_BATCHES with 512 tokens of context per request, and their ratios."""
    lat = profile.latency(model, tp=1)
    prefill_ms = 1e3 * lat.prefill_s(512, 512**2)
    steps = {b: 1e3 * lat.decode_step_s(b, b * 513) for b in REGIME_BATCHES}
    return {"label": label, "model": model, "prefill_512_ms": prefill_ms, "decode_ms": steps,
            "prefill_over_decode": prefill_ms / steps[1], "decode_32_over_1": steps[32] / steps[1]}


def regime_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| profile | 512-token prefill | decode step, batch " + " / ".join(map(str, REGIME_BATCHES)) + \
           " (ms) | prefill / decode(1) | decode(32) / decode(1) |\n|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['label']} | {r['prefill_512_ms']:.1f} ms | " + " / ".join(f"{r['decode_ms'][b]:.1f}" for b in REGIME_BATCHES)
        + f" | {r['prefill_over_decode']:.1f} | {r['decode_32_over_1']:.2f} |\n" for r in rows)


def plot_regimes(rows: list[dict[str, Any]], path) -> Any:
    """Decode step time relative to batch 1 against the batch: flat where a step is bound by
    reading the weights, rising where it is bound by compute (or by an inefficient matmul)."""
    from matplotlib.figure import Figure

    from dsjax.bench.plots import _save

    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    for r in rows:
        ax.plot(REGIME_BATCHES, [r["decode_ms"][b] / r["decode_ms"][1] for b in REGIME_BATCHES], marker="o",
                label=f"{r['label']} (prefill = {r['prefill_over_decode']:.1f} decode steps)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch (512 tokens of context each)")
    ax.set_ylabel("step time / batch-1 step")
    ax.set_title("Decode step cost vs batch, per profile")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
