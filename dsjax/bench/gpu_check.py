"""`python -m dsjax.bench gpu` (`make gpu-check`): what only a GPU can show, as one script.

Three steps, each timed, then a Markdown report (docs/gpu.md by default) naming the device:

1. kernel tests compiled for the GPU: `pytest -m gpu tests/pallas_kernels` (the Pallas kernels
   built by Triton and checked against their jnp references);
2. the kernels against their XLA references (dsjax/bench/kernel_bench.py's quick grid): paged
   decode in TB/s against the card's measured copy bandwidth, ragged prefill in TFLOP/s against
   its measured bf16 matmul peak;
3. end to end: output tokens/s of a Llama-3-8B-shaped model with dummy bf16 weights on one GPU,
   through the offline `LLM` API (colocated engine, Pallas attention), on ShareGPT-shaped lengths
   with up to 256 running requests. The workload runs twice with the same requests: the first
   pass compiles every shape the schedule meets, the second is timed (greedy decoding of dummy
   weights with ignore_eos gives the same schedule, so the timed pass compiles nothing).
   Anchor: vLLM serves Llama-3-8B on one H100 at about 5,300 output tokens/s at saturation.

The GPU machine has no network, so the ShareGPT lengths come from a sample committed beside this
file (dsjax/bench/data/sharegpt-lengths.json, GPT-2 BPE lengths from `dsjax.workloads`; a test
checks it against the loader).

`--dry-run` runs every step on CPU with tiny shapes (the CUDA-lowering kernel tests, the CPU
kernel grid in interpret mode, `tiny-llama` end to end) and labels its report as such: it proves
the script, never a figure. Budget: <= 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LENGTHS_FILE = Path(__file__).resolve().parent / "data" / "sharegpt-lengths.json"
VLLM_ANCHOR_TOKENS_S = 5300  # Llama-3-8B, one H100, output tokens/s at saturation


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckConfig:
    dry_run: bool = False
    out: Path = ROOT / "docs" / "gpu.md"
    model: str = "llama-3-8b"
    dtype: str = "bfloat16"
    num_requests: int = 512
    max_num_seqs: int = 256
    max_model_len: int = 2048
    kv_gib: float = 40.0  # KV pool size on the device

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.max_num_seqs < 1 or self.kv_gib <= 0:
            raise ValueError(f"num_requests, max_num_seqs and kv_gib must be positive: {self}")

    @classmethod
    def dry(cls, out: Path) -> CheckConfig:
        return cls(dry_run=True, out=out, model="tiny-llama", dtype="float32", num_requests=12, max_num_seqs=8,
                   max_model_len=256, kv_gib=0.05)


def write_length_sample(path: Path = LENGTHS_FILE, num_requests: int = 512, seed: int = 0) -> None:
    """Regenerate the committed ShareGPT length sample from the workload loader."""
    from dsjax.workloads.loader import load_workload

    pairs = load_workload("sharegpt", num_requests=num_requests, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"workload": "sharegpt", "seed": seed, "tokenizer": "gpt2", "pairs": pairs}) + "\n")


def sharegpt_lengths(num_requests: int, max_model_len: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs from the committed sample, cut to fit max_model_len."""
    pairs = json.loads(LENGTHS_FILE.read_text())["pairs"]
    out = []
    for i in range(num_requests):
        prompt, output = pairs[i % len(pairs)]
        prompt = max(1, min(prompt, max_model_len // 2))
        out.append((prompt, max(1, min(output, max_model_len - prompt))))
    return out


def run_kernel_tests(cfg: CheckConfig) -> dict:
    """Step 1. On CPU: the CUDA-lowering checks (the kernels built for CUDA, not run)."""
    if cfg.dry_run:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/pallas_kernels/test_kernel_lowering.py"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/pallas_kernels"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    return {"command": " ".join(cmd[2:]), "ok": proc.returncode == 0 and counts.get("passed", 0) > 0,
            "summary": tail, "counts": counts, "seconds": time.perf_counter() - t0}


def run_kernel_bench(cfg: CheckConfig) -> dict:
    """Step 2: kernel and XLA reference times; on a GPU against the card's measured peaks."""
    import jax

    from dsjax.bench import kernel_bench as kb

    t0 = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu"
    result: dict = {"interpret": not on_gpu}
    if on_gpu:
        cases = kb.gpu_grid(quick=True, max_gib=8.0)
        result["copy_bandwidth_tb_s"] = kb.measure_copy_bandwidth() / 1e12
        result["matmul_peak_tflop_s"] = kb.measure_matmul_peak() / 1e12
    else:
        cases = kb.cpu_grid()[:: 2 if cfg.dry_run else 1]
    rows = kb.run_cases(cases, interpret=not on_gpu, iters=10 if on_gpu else 1, max_reference_gib=4.0)
    for case, row in zip(cases, rows):
        seconds = row["kernel_ms"] / 1e3
        if case.kind == "decode":
            row["achieved"] = case.kv_bytes() / seconds / 1e12  # TB/s
            peak = result.get("copy_bandwidth_tb_s")
        else:
            row["achieved"] = case.flops() / seconds / 1e12  # TFLOP/s
            peak = result.get("matmul_peak_tflop_s")
        row["label"] = case.label()
        row["of_peak"] = row["achieved"] / peak if peak else None
    result.update(rows=rows, seconds=time.perf_counter() - t0)
    return result


def run_end_to_end(cfg: CheckConfig, progress: bool = True) -> dict:
    """Step 3: offline output tokens/s on the LLM API; the second of two identical passes is timed."""
    import jax

    import dsjax
    from dsjax.engine.sampling_params import SamplingParams
    from dsjax.engine.scheduler import SchedulerConfig
    from models.config import get_preset

    config = get_preset(cfg.model)
    dtype_bytes = 2 if cfg.dtype == "bfloat16" else 4
    block_size = 16
    num_blocks = int(cfg.kv_gib * 2**30) // (config.kv_bytes_per_token(dtype_bytes) * block_size) + 1
    t0 = time.perf_counter()
    llm = dsjax.LLM(model=cfg.model, dummy_weights=True, dtype=cfg.dtype, num_blocks=num_blocks, block_size=block_size,
                    scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_prefill_tokens=4096,
                                              max_model_len=cfg.max_model_len))
    load_s = time.perf_counter() - t0
    lengths = sharegpt_lengths(cfg.num_requests, cfg.max_model_len)
    prompts = [[(7 * i + j) % (config.vocab_size - 1) + 1 for j in range(p)] for i, (p, _) in enumerate(lengths)]
    sampling = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in lengths]
    passes = []
    for name in ("compile pass", "timed pass"):
        t = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling=sampling)
        passes.append(time.perf_counter() - t)
        if progress:
            print(f"  {name}: {passes[-1]:.1f} s", flush=True)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"model": cfg.model, "dtype": cfg.dtype, "device": str(jax.devices()[0]), "requests": len(lengths),
            "max_num_seqs": cfg.max_num_seqs, "kv_blocks": num_blocks, "load_s": load_s, "compile_pass_s": passes[0],
            "timed_s": passes[1], "output_tokens": tokens, "output_tokens_per_s": tokens / passes[1],
            "mean_prompt": sum(p for p, _ in lengths) / len(lengths), "mean_output": sum(o for _, o in lengths) / len(lengths),
            "attention_backend": llm.model.backend, "seconds": time.perf_counter() - t0}


def render(cfg: CheckConfig, device: str, jax_version: str, results: dict) -> str:
    lines = ["# GPU check" + (" (DRY RUN on CPU: proves the script, not a figure)" if cfg.dry_run else ""), "",
             f"Device: **{device}**, jax {jax_version}. Command: `python -m dsjax.bench gpu"
             + (" --dry-run" if cfg.dry_run else "") + "` (`make gpu-check`).", ""]
    if "kernel_tests" in results:
        r = results["kernel_tests"]
        lines += ["## 1. Kernel tests", "", f"`{r['command']}`: {r['summary']} ({r['seconds']:.0f} s)", ""]
    if "kernel_bench" in results:
        r = results["kernel_bench"]
        lines += ["## 2. Kernels against XLA", ""]
        if "copy_bandwidth_tb_s" in r:
            lines += [f"Measured copy bandwidth {r['copy_bandwidth_tb_s']:.2f} TB/s, bf16 matmul peak "
                      f"{r['matmul_peak_tflop_s']:.0f} TFLOP/s.", ""]
        if r["interpret"]:
            lines += ["Interpret mode on CPU: the times measure the interpreter, not a kernel.", ""]
        lines += ["| case | kernel ms | XLA ms | XLA / kernel | achieved | of peak |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            ref, kernel = row["reference_ms"], row["kernel_ms"]
            unit = "TB/s" if row["kind"] == "decode" else "TFLOP/s"
            ref_ms = "" if ref is None else f"{ref:.3f}"
            ratio = "" if ref is None else f"{ref / kernel:.2f}x"
            of_peak = "" if row["of_peak"] is None else f"{row['of_peak']:.0%}"
            lines.append(f"| {row['label'].strip()} | {kernel:.3f} | {ref_ms} | {ratio} | {row['achieved']:.3g} {unit} | {of_peak} |")
        lines.append("")
    if "end_to_end" in results:
        r = results["end_to_end"]
        lines += ["## 3. End to end", "",
                  f"{r['model']} ({r['dtype']}, dummy weights), {r['requests']} ShareGPT-shaped requests (mean prompt "
                  f"{r['mean_prompt']:.0f}, mean output {r['mean_output']:.0f} tokens), up to {r['max_num_seqs']} running, "
                  f"{r['kv_blocks']} KV blocks of 16 tokens.", "",
                  f"**{r['output_tokens_per_s']:.0f} output tokens/s** ({r['output_tokens']} tokens in {r['timed_s']:.1f} s; "
                  f"load {r['load_s']:.0f} s, compile pass {r['compile_pass_s']:.0f} s). Anchor: vLLM ~"
                  f"{VLLM_ANCHOR_TOKENS_S} output tokens/s for Llama-3-8B on one H100.", ""]
    lines += [f"Total: {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny shapes")
    p.add_argument("--out", type=Path, default=None, help="report path (docs/gpu.md; the dry run needs one)")
    p.add_argument("--skip", nargs="*", default=(), choices=("tests", "kernels", "e2e"), help="steps to leave out")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--kv-gib", type=float, default=None, help="KV pool on the device (default 40)")
    args = p.parse_args(argv)
    if args.dry_run and args.out is None:
        p.error("--dry-run needs --out (it must not overwrite docs/gpu.md)")
    cfg = CheckConfig.dry(args.out) if args.dry_run else CheckConfig(out=args.out or CheckConfig.out)
    overrides = {k: v for k, v in (("num_requests", args.num_requests), ("kv_gib", args.kv_gib)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)

    import jax

    if not cfg.dry_run and jax.default_backend() != "gpu":
        p.error(f"no GPU (jax backend {jax.default_backend()!r}); use --dry-run on CPU")
    device = str(jax.devices()[0].device_kind if hasattr(jax.devices()[0], "device_kind") else jax.devices()[0])
    t0 = time.perf_counter()
    results: dict = {}
    steps = [("tests", "kernel_tests", run_kernel_tests), ("kernels", "kernel_bench", run_kernel_bench),
             ("e2e", "end_to_end", run_end_to_end)]
    for i, (flag, key, fn) in enumerate(steps, 1):
        if flag in args.skip:
            continue
        print(f"[{i}/{len(steps)}] {key.replace('_', ' ')} ...", flush=True)
        results[key] = fn(cfg)
        print(f"[{i}/{len(steps)}] done in {results[key]['seconds']:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t0
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(render(cfg, device, jax.__version__, results))
    cfg.out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {cfg.out} ({results['seconds']:.0f} s)")
    ok = results.get("kernel_tests", {"ok": True})["ok"]
    return 0 if ok else 1
