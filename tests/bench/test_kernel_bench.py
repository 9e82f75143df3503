"""`python -m dsjax.bench kernels`: the GPU grid lowers for CUDA; the CPU interpret path runs."""

import pytest

from dsjax.bench import kernel_bench as bench


def test_gpu_grid_lowers_for_cuda(capsys):
    assert bench.main(["--lower-only", "--quick"]) == 0
    assert "lower(cuda) FAILED" not in capsys.readouterr().out


def test_gpu_grid_respects_memory_cap():
    cases = bench.gpu_grid(quick=False, max_gib=4.0)
    decode = [case for case in cases if case.kind == "decode"]
    assert decode and all(case.kv_bytes() <= 4 * bench.GIB for case in decode)
    assert {case.kind for case in cases} == {"decode", "prefill"}


@pytest.mark.slow
def test_cpu_interpret_run(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert bench.main(["--json", str(out_file)]) == 0
    assert "INTERPRET mode" in capsys.readouterr().out
    assert out_file.read_text().count("kernel_ms") == len(bench.cpu_grid())
