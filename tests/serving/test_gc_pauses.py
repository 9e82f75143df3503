"""Garbage collection kept out of serving's way, and its pauses counted (serving/gc_pauses.py)."""

import gc

import pytest

from serving.gc_pauses import YOUNG_THRESHOLD, GCPauses, quiet_gc, restore_gc


@pytest.fixture
def unfrozen():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # give the test process's objects back to the collector, at its old pace
    gc.set_threshold(*thresholds)


class _Node:  # a tracked container that can sit in a cycle
    def __init__(self):
        self.other = None


def test_pauses_are_counted_per_generation_until_uninstalled():
    pauses = GCPauses().install()
    try:
        gc.collect()  # a full collection
        gc.collect(0)
        snap = pauses.snapshot()
        assert snap["gen2"]["collections"] >= 1 and snap["gen0"]["collections"] >= 1
        assert snap["gen2"]["pause_total_ms"] > 0 and snap["gen2"]["pause_max_ms"] <= snap["gen2"]["pause_total_ms"]
        assert "gen2: " in pauses.summary_line()
    finally:
        pauses.uninstall()
    before = pauses.snapshot()["gen2"]["collections"]
    gc.collect()
    assert pauses.snapshot()["gen2"]["collections"] == before


def test_quiet_gc_takes_start_up_objects_out_of_full_collections(unfrozen):
    """Objects alive at the freeze are no longer in any generation a collection traverses; cycles
    made afterwards are still collected."""
    start_up = [{"i": i} for i in range(50_000)]  # what start-up leaves behind
    gc.collect()
    assert len(gc.get_objects(generation=2)) >= 50_000
    gc.set_threshold(700, 10, 10)
    frozen = quiet_gc()
    # (the count only falls from there: a frozen object is still freed when its last reference goes)
    assert frozen >= 50_000 and 50_000 <= gc.get_freeze_count() <= frozen
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)  # young collections rarer, the older ones as they were
    assert len(gc.get_objects(generation=2)) < 1_000  # a full collection now walks almost nothing
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle made while serving
    del a, b
    assert gc.collect() >= 2
    assert quiet_gc(freeze=False, young_threshold=0) == 0 and len(start_up) == 50_000
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)  # 0: left as it was
    restore_gc((700, 10, 10))
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)
    assert len(gc.get_objects(generation=2)) >= 50_000  # back where a full collection sees them


def test_prometheus_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    pauses = GCPauses().install()
    try:
        gc.collect()
        registry = CollectorRegistry()
        registry.register(pauses)
        text = generate_latest(registry).decode()
    finally:
        pauses.uninstall()
    assert float(text.split('dsjax_gc_collections_total{generation="2"} ')[1].split()[0]) >= 1
    assert 'dsjax_gc_pause_seconds_total{generation="0"}' in text and "dsjax_gc_pause_max_seconds" in text


def test_thresholds_are_validated_before_anything_changes():
    from dsjax.serve import parse_args

    before = gc.get_threshold()
    with pytest.raises(ValueError, match="young_threshold=-1 must be >= 0"):
        quiet_gc(young_threshold=-1)
    assert gc.get_threshold() == before
    assert parse_args(["--gc-young-threshold", "0"]).gc_young_threshold == 0
    assert parse_args([]).gc_young_threshold == YOUNG_THRESHOLD and not parse_args([]).no_gc_freeze
    for bad in ("-5", "many"):
        with pytest.raises(SystemExit):
            parse_args(["--gc-young-threshold", bad])
