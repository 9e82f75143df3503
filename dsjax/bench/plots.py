"""PNG plots of a benchmark: attainment vs rate, attainment vs SLO scale, latency breakdown.

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot state), small by default
(6 x 3.6 in at 100 dpi: tens of kB) so they can live under docs/img/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

_FIGSIZE = (6.0, 3.6)
_DPI = 100
_PARTS = (("queue_s", "queue"), ("prefill_s", "prefill"), ("transfer_s", "KV transfer"), ("decode_s", "decode"),
          ("other_s", "network/router"))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    *,
    target: float = 0.9,
    goodputs: Mapping[str, float] | None = None,
    per_device: Mapping[str, int] | None = None,
    title: str = "",
) -> Path:
    """series: system -> rows with `rate`, `attainment_joint`, `attainment_ttft`, `attainment_tpot`.

    Joint attainment solid, TTFT dashed, TPOT dotted; a grey line at the target; each system's
    goodput as a vertical tick. With `per_device` (system -> devices) the x axis is rate per device.
    """
    fig = Figure(figsize=_FIGSIZE)
    ax = fig.add_subplot()
    colors = {}
    for system, rows in series.items():
        rows = sorted(rows, key=lambda r: r["rate"])
        div = per_device.get(system, 1) if per_device else 1
        x = [r["rate"] / div for r in rows]
        (line,) = ax.plot(x, [100 * r["attainment_joint"] for r in rows], "o-", label=f"{system} (both)")
        colors[system] = line.get_color()
        ax.plot(x, [100 * r["attainment_ttft"] for r in rows], "--", color=line.get_color(), alpha=0.6, label=f"{system} TTFT")
        ax.plot(x, [100 * r["attainment_tpot"] for r in rows], ":", color=line.get_color(), alpha=0.6, label=f"{system} TPOT")
    for system, rate in (goodputs or {}).items():
        if rate > 0 and system in colors:
            div = per_device.get(system, 1) if per_device else 1
            ax.axvline(rate / div, color=colors[system], lw=0.8, alpha=0.5)
    ax.axhline(100 * target, color="grey", lw=0.8)
    ax.set_xlabel("rate per device (req/s)" if per_device else "rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=max(1, len(series)), loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_attainment_vs_slo_scale(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *, target: float = 0.9, title: str = ""
) -> Path:
    """curves: label -> [(SLO scale, joint attainment)]; log x axis, the target as a grey line."""
    fig = Figure(figsize=_FIGSIZE)
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot([s for s, _ in points], [100 * a for _, a in points], "o-", ms=3, label=label)
    ax.axhline(100 * target, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("SLO scale (x both SLOs)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_latency_breakdown(bars: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "") -> Path:
    """bars: label -> mean seconds per request of queue_s, prefill_s, transfer_s, decode_s, other_s
    (missing parts count 0); one stacked bar per label."""
    fig = Figure(figsize=_FIGSIZE)
    ax = fig.add_subplot()
    labels = list(bars)
    bottoms = [0.0] * len(labels)
    for key, name in _PARTS:
        heights = [float(bars[label].get(key, 0.0) or 0.0) for label in labels]
        ax.bar(range(len(labels)), heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    # A pathological bar would flatten the others: cap the axis at 3x the median total and print
    # the clipped totals instead.
    cap = 3 * float(np.median(bottoms)) if bottoms else 0.0
    if cap > 0 and max(bottoms) > cap:
        ax.set_ylim(0, cap)
        for i, total in enumerate(bottoms):
            if total > cap:
                ax.text(i, cap * 0.97, f"{total:.1f} s", ha="center", va="top", fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=15)
    ax.set_ylabel("mean seconds per request")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_measured_vs_simulated(rows: Sequence[Mapping[str, float]], path: str | Path, *, target: float = 0.9,
                               title: str = "") -> Path:
    """rows: the summary's fidelity entries (system, rate, real, simulated): per system the measured
    joint attainment (solid) and the simulator's on the same trace (dashed) against the rate."""
    fig = Figure(figsize=_FIGSIZE)
    ax = fig.add_subplot()
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        x = [r["rate"] for r in mine]
        (line,) = ax.plot(x, [100 * r["real"] for r in mine], "o-", label=f"{system} measured")
        ax.plot(x, [100 * r["simulated"] for r in mine], "x--", color=line.get_color(), label=f"{system} simulated")
    ax.axhline(100 * target, color="grey", lw=0.8)
    ax.set_xlabel("rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path)
