"""A chaos soak over real worker processes (tests/support/chaos.py): random workers killed or
paused (SIGSTOP) while clients stream. Every request completes with the right tokens or fails with
a clear status, no KV block leaks once things settle, and the server keeps serving. The quick one
runs by default (~40 s of chaos after ~30 s of start-up); the long one is `slow`."""

import pytest

from tests.support.chaos import run_chaos


def test_chaos_quick(tmp_path):
    report = run_chaos(40.0, tmp_path, seed=0, clients=4)
    print(report.summary())
    assert report.actions, "nothing was hit"
    report.check()


@pytest.mark.slow
def test_chaos_long(tmp_path):
    report = run_chaos(300.0, tmp_path, seed=1, clients=6)
    print(report.summary())
    assert len(report.actions) >= 5
    report.check(min_completed=0.6)
