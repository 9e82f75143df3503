"""What `python -m dsjax.bench capacity` (dsjax/bench/capacity.py) measures besides SLO attainment:
the CPU of every process, the latency the control plane adds over the emulated devices' own time,
the router's profile, and the plot.

- CPU (`CPUSampler`): utime + stime of the server process and all its descendants (router,
  worker processes) from /proc, plus this process (the benchmark client) and the whole machine
  (/proc/stat); a run's use is Δ CPU seconds / Δ wall seconds, in cores.
- Overhead (`overhead`): every request's client-side TTFT and TPOT minus the simulator's on the
  same trace (the planner's simulator replays the same requests, send times, placement and
  scheduler limits; it is the emulated devices' time with queueing and no host time at all).
  The TTFT difference is split at the prefill engine (its queue + prefill) and at the router
  (its first-token time): engine - simulator, router - engine, client - router.
- Router profile: `py-spy record --gil --format raw` of the router process (sampled from outside, 100 Hz,
  non-blocking: the router is not paused), read back into self time by file and inclusive time by
  function (`summarize_pyspy`), and the CPU of each of its OS threads by name (`thread_cpu`).
"""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[str, int, float] | None:
    """(comm, ppid, utime + stime seconds) from a /proc .../stat file; None when gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], int(fields[1]), (int(fields[11]) + int(fields[12])) / _TCK


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds; None when it is gone."""
    st = _stat(f"/proc/{pid}/stat")
    return None if st is None else st[2]


def descendants(root: int) -> list[int]:
    """`root` and every process below it (children of children ...), from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(f"/proc/{entry}/stat")) is not None:
            children[st[1]].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def process_name(pid: int, root: int) -> str:
    """"router" (the server process), a worker's --worker-id (prefill-3, decode-0), else its comm."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    if "--worker-id" in argv[:-1]:
        return argv[argv.index("--worker-id") + 1]
    return "router" if pid == root else (_stat(f"/proc/{pid}/stat") or ("?",))[0]


class CPUSampler:
    """CPU seconds of the server's process tree, of this process and of the machine, on demand."""

    def __init__(self, root_pid: int):
        self.root = root_pid
        self.names: dict[int, str] = {}

    def sample(self) -> dict[str, Any]:
        procs = {}
        for pid in descendants(self.root):
            st = _stat(f"/proc/{pid}/stat")
            if st is not None:
                name = self.names.setdefault(pid, process_name(pid, self.root))
                procs[name] = procs.get(name, 0.0) + st[2]
        t = os.times()
        return {"wall": time.perf_counter(), "procs": procs, "client": t.user + t.system, "machine": machine_busy_s()}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / _TCK


def cpu_use(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Cores used between two samples: per process, per group (router, prefill / decode workers,
    client, other processes on the machine) and the busiest single worker."""
    wall = max(b["wall"] - a["wall"], 1e-9)
    per = {k: round((v - a["procs"].get(k, 0.0)) / wall, 4) for k, v in b["procs"].items()}
    groups: dict[str, float] = collections.defaultdict(float)
    for name, cores in per.items():
        groups["prefill workers" if name.startswith("prefill") else "decode workers" if name.startswith("decode")
               else "router" if name == "router" else "other server processes"] += cores
    groups["client"] = (b["client"] - a["client"]) / wall
    busy = (b["machine"] - a["machine"]) / wall
    groups["other processes"] = max(0.0, busy - sum(groups.values()))
    workers = {k: v for k, v in per.items() if k.startswith(("prefill", "decode"))}
    busiest = max(workers.items(), key=lambda kv: kv[1]) if workers else (None, 0.0)
    return {"processes": per, "groups": {k: round(v, 4) for k, v in groups.items()}, "machine_busy": round(busy, 4),
            "busiest_worker": {"name": busiest[0], "cores": busiest[1]}, "cpus": os.cpu_count(), "wall_s": round(wall, 3)}


def cpu_per_token_us(cpu: dict[str, Any], tokens: int) -> dict[str, float | None]:
    """CPU microseconds per output token delivered, per group (the run's CPU seconds / its tokens)."""
    return {k: round(1e6 * v * cpu["wall_s"] / tokens, 1) if tokens else None for k, v in cpu["groups"].items()}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name (digits dropped: router_12 -> router_#)."""
    out: dict[str, float] = collections.defaultdict(float)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        st = _stat(f"/proc/{pid}/task/{tid}/stat")
        if st is not None:
            out[re.sub(r"\d+", "#", st[0])] += st[2]
    return dict(out)


def proc_counters(pid: int) -> dict[str, float]:
    """User and system CPU seconds of a process and the context switches of all its threads."""
    out = {"user_s": 0.0, "system_s": 0.0, "context_switches": 0.0}
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        out["user_s"], out["system_s"] = int(fields[11]) / _TCK, int(fields[12]) / _TCK
        for tid in os.listdir(f"/proc/{pid}/task"):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                    out["context_switches"] += int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return out


# ---- overhead over the emulated devices ----------------------------------------------------------

def _pcts(values: Sequence[float], qs=(50, 90, 99)) -> dict[str, float] | None:
    v = [x for x in values if math.isfinite(x)]
    return {f"p{q}": round(1e3 * float(np.percentile(v, q)), 3) for q in qs} if v else None


def overhead(run, sim, slos) -> dict[str, Any]:
    """Client-side latency minus the simulator's (the devices' time, queueing included), in ms:
    TTFT and TPOT (= added latency per output token), p50 / p90 / p99 over served requests; the
    TTFT difference split in engine - simulator, router - engine, client - router; the simulator's
    own attainment and device TTFT / TPOT; p99 overheads as fractions of the SLOs."""
    from dsjax.bench.metrics import tpot_s, ttft_s

    ttft, tpot = [], []
    parts: dict[str, list[float]] = {"engine_minus_sim": [], "router_minus_engine": [], "client_minus_router": []}
    for i, r in enumerate(run.results):
        if not r.record.ok:
            continue
        c_ttft, c_tpot = ttft_s(r.record), tpot_s(r.record)
        s_ttft, s_tpot = float(sim.ttft_s[i]), float(sim.tpot_s[i])
        ttft.append(c_ttft - s_ttft)
        if c_tpot is not None and math.isfinite(s_tpot):
            tpot.append(c_tpot - s_tpot)
        if r.breakdown is not None and r.server_ttft_s is not None:
            engine = r.breakdown.queue_s + r.breakdown.prefill_s
            parts["engine_minus_sim"].append(engine - s_ttft)
            parts["router_minus_engine"].append(r.server_ttft_s - engine)
            parts["client_minus_router"].append(c_ttft - r.server_ttft_s)
    out: dict[str, Any] = {"ttft_overhead_ms": _pcts(ttft), "tpot_overhead_ms": _pcts(tpot),
                           "ttft_parts_ms": {k: _pcts(v) for k, v in parts.items()},
                           "sim_attainment": float(sim.attainment),
                           "device_ttft_ms": _pcts(sim.ttft_s[np.isfinite(sim.ttft_s)]),
                           "device_tpot_ms": _pcts(sim.tpot_s[np.isfinite(sim.tpot_s)])}
    out["p99_over_slo"] = {
        "ttft": None if not ttft else round(out["ttft_overhead_ms"]["p99"] / (1e3 * slos.ttft_s), 4),
        "tpot": None if not tpot else round(out["tpot_overhead_ms"]["p99"] / (1e3 * slos.tpot_s), 4)}
    return out


# ---- the router's profile ----------------------------------------------------------------------

PYSPY_HZ = 100


def start_pyspy(pid: int, seconds: int, path: Path) -> subprocess.Popen | None:
    """`py-spy record --gil` of `pid` for `seconds` into `path` (raw collapsed stacks of the thread
    holding the GIL, PYSPY_HZ samples a second while one does); None without py-spy."""
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    cmd = [exe, "record", "-p", str(pid), "-d", str(seconds), "-r", str(PYSPY_HZ), "-f", "raw", "-o", str(path),
           "--nonblocking", "--gil"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame(frame: str) -> tuple[str, str]:
    """("func (file)", "file") of a py-spy frame "func (path/file.py:123)", the path shortened to
    the package (serving/router.py, grpc/_server.py, threading.py)."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    func, path = (m.group(1), m.group(2)) if m else (frame, "?")
    root = str(Path(__file__).resolve().parents[2]) + "/"
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(root):
        path = path[len(root):]
    elif re.search(r"/lib/python3[.\d]*/", path):
        path = re.split(r"/lib/python3[.\d]*/", path, maxsplit=1)[1]
    return f"{func} ({path})", path


def summarize_pyspy(path: Path, seconds: float | None = None, top: int = 15) -> dict[str, Any]:
    """Samples, self time by file, self and inclusive time by function (fractions of samples);
    with `seconds` (the recording's length) also the fraction of the time the GIL was held."""
    self_file: collections.Counter = collections.Counter()
    self_func: collections.Counter = collections.Counter()
    incl_func: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_func[frames[-1][0]] += n
        self_file[frames[-1][1]] += n
        for func in {f for f, _ in frames}:
            incl_func[func] += n

    def frac(c: collections.Counter, keep=lambda k, v: True) -> list[list]:
        return [[k, round(v / total, 4)] for k, v in c.most_common() if keep(k, v)][:top] if total else []

    return {"samples": total, "gil_held_fraction": round(total / (PYSPY_HZ * seconds), 3) if seconds else None,
            "self_by_file": frac(self_file), "self_by_function": frac(self_func),
            # the threads' roots (Thread._bootstrap ... in every sample) left out
            "inclusive_by_function": frac(incl_func, lambda k, v: v < 0.98 * total),
            "inclusive_project": frac(incl_func, lambda k, v: re.search(r"\((serving|dsjax|models)/", k) is not None)}


# ---- the report ----------------------------------------------------------------------------------

def fmt_pcts(p: dict | None) -> str:
    return "-" if not p else f"{p['p50']:.1f}/{p['p99']:.1f}"


def _per_token(row: dict[str, Any]) -> str:
    us = row.get("cpu_us_per_token") or {}
    workers = (us.get("prefill workers") or 0) + (us.get("decode workers") or 0)
    return f"{us.get('router') or 0:.0f}, {workers:.0f}"


def diagnose(row: dict[str, Any] | None, prof: dict[str, Any] | None) -> str:
    """What the CPU looked like at the first failing rate (else the highest run): the machine's
    busy cores against its count, the biggest users, and the router's GIL at the capacity."""
    if row is None:
        return "no run"
    cpu, cpus = row["cpu"], row["cpu"]["cpus"]
    users = sorted(cpu["groups"].items(), key=lambda kv: -kv[1])
    text = (f"at {row['rate']:g} req/s the machine was {cpu['machine_busy']:.2f} of {cpus} cores busy"
            + (" (saturated)" if cpu["machine_busy"] >= 0.9 * cpus else "") + ": "
            + ", ".join(f"{k} {v:.2f}" for k, v in users if v >= 0.01))
    spy = (prof or {}).get("pyspy")
    if isinstance(spy, dict) and spy.get("gil_held_fraction") is not None:
        text += f"; the router's GIL was held {100 * spy['gil_held_fraction']:.0f}% of the time at {prof['rate']:g} req/s"
    return text


def markdown(s: dict[str, Any]) -> str:
    cfg = s["config"]
    lines = [f"# Router capacity: {cfg['model']}, {cfg['devices']} emulated devices, workers {cfg['workers']}", "",
             f"{s['placement']}; {cfg['prompt_len']} + {cfg['output_len']} tokens; SLOs TTFT {cfg['ttft_s']:g} s, "
             f"TPOT {cfg['tpot_s']:g} s; capacity **{s['capacity_rate']:g} req/s**"
             + (" (every rate passed)" if s["saturated"] else ""), "",
             f"Limit: {s['limit']}", "",
             "| req/s | attain. | devices alone | tok/s | added TTFT p50/p99 ms | added TPOT p50/p99 ms | router | "
             "prefill w. | decode w. | client | other | machine | router, workers µs/token |", "|" + "---|" * 13]
    groups = ("router", "prefill workers", "decode workers", "client", "other processes")
    for r in s["rows"]:
        g, o = r["cpu"]["groups"], r["overhead"]
        cells = [f"{r['rate']:g}", f"{100 * r['attainment_joint']:.1f}", f"{100 * o['sim_attainment']:.1f}",
                 f"{r['output_token_rate']:.0f}", fmt_pcts(o["ttft_overhead_ms"]), fmt_pcts(o["tpot_overhead_ms"]),
                 *(f"{g.get(k, 0):.2f}" for k in groups), f"{r['cpu']['machine_busy']:.2f}", _per_token(r)]
        lines.append("| " + " | ".join(cells) + " |")
    prof = s.get("router_profile") or {}
    spy = prof.get("pyspy")

    def listed(title: str, pairs: list) -> list[str]:
        return ["", title, ""] + [f"- {k}: {100 * v:.1f}%" for k, v in pairs]

    if isinstance(spy, dict) and spy["samples"]:
        lines += listed(f"Router at {prof['rate']:g} req/s, py-spy --gil ({spy['samples']} samples; the GIL held "
                        f"{100 * (spy['gil_held_fraction'] or 0):.0f}% of the time; py-spy itself used "
                        f"{prof.get('pyspy_cores', 0):.2f} cores, that run's attainment "
                        f"{100 * prof['row']['attainment_joint']:.1f}%), self time by file:", spy["self_by_file"][:10])
        lines += listed("Inclusive time by function:", spy["inclusive_by_function"][:12])
        lines += listed("Inclusive time in the project's code:", spy["inclusive_project"][:10])
    if prof.get("thread_cores"):
        threads = ", ".join(f"{k} {v:.2f}" for k, v in list(prof["thread_cores"].items())[:8])
        lines += ["", f"Router threads (cores): {threads}; user {prof['router_user_cores']:.2f} + system "
                      f"{prof['router_system_cores']:.2f} cores; {prof['router_context_switches_per_s']} context "
                      f"switches/s ({prof['router_context_switches_per_token']} per output token)"]
    return "\n".join(lines) + "\n"


# ---- the plot ------------------------------------------------------------------------------------

def plot_capacity(rows: Sequence[dict[str, Any]], path: str | Path, *, target: float, capacity: float | None,
                  cpus: int, title: str = "") -> Path:
    """Three panels against the rate: SLO attainment (measured, simulated), the added latency
    (TTFT and TPOT overhead p50 / p99, ms) and CPU cores per process group."""
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["rate"])
    x = [r["rate"] for r in rows]
    fig = Figure(figsize=(14.0, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(x, [100 * r["attainment_joint"] for r in rows], "o-", label="measured (both)")
    ax1.plot(x, [100 * r["attainment_ttft"] for r in rows], "--", alpha=0.6, label="measured TTFT")
    ax1.plot(x, [100 * r["attainment_tpot"] for r in rows], ":", alpha=0.6, label="measured TPOT")
    ax1.plot(x, [100 * r["overhead"]["sim_attainment"] for r in rows], "s--", color="grey", label="devices only (simulated)")
    ax1.axhline(100 * target, color="grey", lw=0.8)
    ax1.set(xlabel="rate (req/s)", ylabel="SLO attainment (%)", ylim=(-3, 103))
    for key, color in (("ttft_overhead_ms", "C0"), ("tpot_overhead_ms", "C1")):
        for q, style in (("p50", "o-"), ("p99", "^--")):
            y = [(r["overhead"][key] or {}).get(q, math.nan) for r in rows]
            ax2.plot(x, [max(v, 1e-2) for v in y], style, color=color, label=f"{key.split('_')[0].upper()} {q}")
    ax2.set(xlabel="rate (req/s)", ylabel="added latency (ms)", yscale="log")
    groups = [g for g in ("router", "prefill workers", "decode workers", "other server processes", "client",
                          "other processes") if any(r["cpu"]["groups"].get(g, 0) > 0.005 for r in rows)]
    ax3.stackplot(x, [[r["cpu"]["groups"].get(g, 0.0) for r in rows] for g in groups], labels=groups, alpha=0.8)
    ax3.axhline(cpus, color="k", lw=0.8)
    ax3.set(xlabel="rate (req/s)", ylabel=f"CPU cores (machine: {cpus})")
    from matplotlib.ticker import NullFormatter

    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if capacity:
            ax.axvline(capacity, color="k", lw=0.8, alpha=0.4)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
