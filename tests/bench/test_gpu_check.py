"""`python -m dsjax.bench gpu` (make gpu-check): the committed ShareGPT length sample matches the
workload loader, the script refuses to run without a GPU unless asked for its dry run, and the dry
run (every step on CPU with tiny shapes) writes a report that says it is one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsjax.bench import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_committed_lengths_are_the_loaders_sample():
    from dsjax.workloads.loader import load_workload

    stored = json.loads(gpu_check.LENGTHS_FILE.read_text())
    assert stored["workload"] == "sharegpt" and len(stored["pairs"]) == 512
    assert [tuple(p) for p in stored["pairs"]] == load_workload("sharegpt", num_requests=512, seed=stored["seed"])


def test_lengths_fit_the_context():
    pairs = gpu_check.sharegpt_lengths(700, max_model_len=256)
    assert len(pairs) == 700 and all(p >= 1 and o >= 1 and p + o <= 256 for p, o in pairs)


def test_refuses_without_a_gpu_and_a_dry_run_without_out(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([])  # this machine has no GPU
    assert "use --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run"])
    assert "--dry-run needs --out" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "-m", "dsjax.bench", "gpu", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# GPU check (DRY RUN on CPU")
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["kernel_tests"]["ok"] and results["kernel_tests"]["counts"]["passed"] > 0
    assert all(r["kernel_ms"] > 0 for r in results["kernel_bench"]["rows"])
    e2e = results["end_to_end"]
    assert e2e["output_tokens"] == sum(o for _, o in gpu_check.sharegpt_lengths(e2e["requests"], 256))
    assert e2e["output_tokens_per_s"] > 0 and "output tokens/s" in report
