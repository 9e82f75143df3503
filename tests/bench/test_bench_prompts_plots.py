"""What is sent (prompt formats within the served vocabulary) and that the plots are written."""

import pytest

from dsjax.bench.plots import plot_attainment_vs_rate, plot_attainment_vs_slo_scale, plot_latency_breakdown
from dsjax.bench.prompts import byte_prompt, load_bench_requests, to_bench_requests
from dsjax.workloads import WorkloadRequest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_byte_prompt_is_exactly_the_requested_length():
    assert byte_prompt("héllo", 3) == (104, 195, 169)
    assert byte_prompt("ab", 5) == (97, 98, 97, 98, 97)
    assert len(byte_prompt("", 4)) == 4


def test_formats_and_vocabulary_checks():
    wr = WorkloadRequest(source_id="x", prompt="héllo world", prompt_token_ids=(71, 20, 995), prompt_len=3, output_len=7)
    (b,) = to_bench_requests([wr])
    assert b.prompt_token_ids == (104, 195, 169) and b.output_len == 7 and b.prompt_text is None
    (g,) = to_bench_requests([wr], prompt_format="gpt2")
    assert g.prompt_token_ids == (71, 20, 995)
    (r,) = to_bench_requests([wr], prompt_format="random", vocab_size=10, seed=1)
    assert len(r.prompt_token_ids) == 3 and max(r.prompt_token_ids) < 10
    (t,) = to_bench_requests([wr], prompt_format="text")
    assert t.prompt_text == "héllo world" and t.prompt_token_ids is None
    with pytest.raises(ValueError, match="vocab_size=512"):
        to_bench_requests([wr], prompt_format="gpt2", vocab_size=512)
    with pytest.raises(ValueError, match="needs vocab_size"):
        to_bench_requests([wr], prompt_format="random")


def test_real_workload_prompts_fit_a_byte_vocabulary():
    reqs = load_bench_requests("humaneval", num_requests=20, seed=0, scale=4, vocab_size=512)
    assert len(reqs) == 20
    for r in reqs:
        assert len(r.prompt_token_ids) == r.prompt_len >= 1 and max(r.prompt_token_ids) < 256
    with pytest.raises(ValueError, match="use a larger scale"):
        load_bench_requests("humaneval", num_requests=20, seed=0, max_total_len=64)


def _rows(scale):
    return [{"rate": r, "attainment_joint": a * scale, "attainment_ttft": min(1, a * scale + 0.05), "attainment_tpot": 1.0}
            for r, a in ((1, 1.0), (2, 0.95), (4, 0.6))]


def test_plots_are_written_and_small(tmp_path):
    paths = [
        plot_attainment_vs_rate({"disaggregated": _rows(1.0), "colocated": _rows(0.8)}, tmp_path / "a.png",
                                goodputs={"disaggregated": 2.5, "colocated": 1.2},
                                per_device={"disaggregated": 2, "colocated": 2},
                                title="t"),
        plot_attainment_vs_slo_scale({"x": [(0.5, 0.2), (1.0, 0.9), (2.0, 1.0)]}, tmp_path / "b.png"),
        plot_latency_breakdown({"disagg 2": {"queue_s": 0.1, "prefill_s": 0.05, "transfer_s": 0.01, "decode_s": 0.5},
                                "coloc 2": {"queue_s": 0.3, "prefill_s": 0.05, "decode_s": 0.9},
                                "chunk 2": {"queue_s": 9.0, "decode_s": 30.0}},  # clipped, labelled
                               tmp_path / "sub" / "c.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and 2_000 < len(data) < 150_000
