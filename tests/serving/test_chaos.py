"""The chaos soak over real processes (tests/support/chaos.py): a router and two prefill and two
decode workers, each its own process; a decode worker SIGKILLed, another SIGSTOPped past the
heartbeat timeout, the router SIGKILLed and restarted, corrupted KV chunks injected, while clients
abort requests, set tight deadlines and read slowly. Every request ends with the clean run's
tokens or a clear status (>= 99% of those not aborted on purpose complete; quick: 98%), no
stream outlives its deadline, the decode workers refuse (and count) corrupted chunks, no KV block
leaks once things settle, and the server keeps serving. The quick one runs by default (40 s of
chaos after ~10 s of start-up, about a minute in all); the long one (`slow`: 8 minutes, >= 2,000 requests, a 20 s
SIGSTOP, random kills and pauses besides) also checks that RSS grows < 10% after five minutes."""

import pytest

from tests.support.chaos import long_plan, quick_plan, run_chaos


def test_chaos_quick(tmp_path):
    report = run_chaos(quick_plan(), tmp_path)
    print(report.summary())
    report.check()
    f = report.figures()
    assert f["aborted_cancelled"] and f["deadline_exceeded"] and f["slow"], "a kind of client fault never happened"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 8 minutes of chaos, start-up and settling: past the default 600 s
def test_chaos_long(tmp_path):
    report = run_chaos(long_plan(), tmp_path)
    print(report.summary())
    report.check()
    assert len(report.actions) >= 10, report.actions
