import pytest

from dsjax.planner.model_spec import (
    MemoryModel,
    canonical_model_name,
    get_device,
    get_model,
    parallel_config_error,
    read_max_num_tokens,
)
from tests.support.planner_reference import max_num_tokens_csv


def test_model_facts():
    m = get_model("opt-13b")
    assert (m.num_layers, m.num_heads, m.hidden_size) == (40, 40, 5120)
    assert m.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert get_model("facebook/opt-66b").num_heads == 72
    assert get_model("opt-175b").num_layers == 96
    assert get_model("llama-2-70b").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert canonical_model_name("opt-13b") == "facebook/opt-13b"
    assert canonical_model_name("my/model") == "my/model"
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        get_model("gpt-5")


def test_max_num_tokens_table():
    table = read_max_num_tokens(max_num_tokens_csv())
    mem = MemoryModel(model=get_model("opt-13b"), table=table)
    assert mem.kv_capacity_tokens(1, 1) == 66144
    assert mem.kv_capacity_tokens(2, 1) == 163008
    assert mem.kv_capacity_tokens(1, 3) is None  # absent from the file: does not fit
    assert MemoryModel(model=get_model("opt-66b"), table=table).kv_capacity_tokens(1, 1) is None


def test_estimate_is_close_to_distserve_table():
    table = read_max_num_tokens(max_num_tokens_csv())
    for name, configs in (("opt-13b", [(1, 1), (2, 1), (4, 1), (2, 2)]), ("opt-66b", [(2, 1), (4, 1), (8, 1), (4, 2)])):
        model = get_model(name)
        est = MemoryModel(model=model)
        tab = MemoryModel(model=model, table=table)
        for tp, pp in configs:
            assert est.kv_capacity_tokens(tp, pp) == pytest.approx(tab.kv_capacity_tokens(tp, pp), rel=0.1), (name, tp, pp)
    assert MemoryModel(model=get_model("opt-175b")).kv_capacity_tokens(1, 1) is None  # 350 GB of weights
    h200 = MemoryModel(model=get_model("opt-66b"), device=get_device("h200"))
    assert h200.kv_capacity_tokens(1, 1) is None  # 131 GB of weights > 92% of 141 GB
    assert h200.kv_capacity_tokens(2, 1) > MemoryModel(model=get_model("opt-66b")).kv_capacity_tokens(2, 1)


def test_read_max_num_tokens_errors(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("model,tp\nm,1\n")
    with pytest.raises(ValueError, match="header"):
        read_max_num_tokens(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_max_num_tokens(tmp_path / "missing.csv")


def test_parallel_constraints():
    m = get_model("opt-66b")
    assert parallel_config_error(m, tp=4, pp=2, gpus_per_node=8) is None
    assert "num_heads=72" in parallel_config_error(m, tp=5, pp=1)
    assert "num_layers=64" in parallel_config_error(m, tp=2, pp=3)
    assert "gpus_per_node=4" in parallel_config_error(m, tp=8, pp=1, gpus_per_node=4)
    assert parallel_config_error(get_model("llama-2-70b"), tp=16, pp=1) is None  # KV heads replicated
