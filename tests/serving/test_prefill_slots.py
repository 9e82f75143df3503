"""The router holds at most `max_prefill_inflight` Prefill calls on a prefill worker
(serving/remote.py, RemoteBackend.slot): more wait in the router, first come first served, so a
worker's gRPC threads never all wait on prefills while its lease renewals need one."""

import asyncio

import pytest

from serving.proto.dsjax.v1 import worker_pb2 as wpb
from serving.registry import BUSY, Registry
from serving.remote import RemoteBackend


@pytest.fixture()
def backend():
    registry = Registry(hung_s=None)
    registry.add(wpb.WorkerInfo(worker_id="prefill-0", role=wpb.PREFILL, address="127.0.0.1:9", pid=1))
    b = RemoteBackend(registry, max_prefill_inflight=2)
    yield b
    b.close()
    registry.close()


def on_loop(b, coro):
    return asyncio.run_coroutine_threadsafe(coro, b.loop).result(10)


def test_slots_wait_in_arrival_order(backend):
    reg = backend.registry

    async def scenario():
        a = await backend.slot(wpb.PREFILL, 10)
        b = await backend.slot(wpb.PREFILL, 10)
        assert reg.acquire(wpb.PREFILL, 0, max_inflight=2) is BUSY
        waiting = [asyncio.ensure_future(backend.slot(wpb.PREFILL, 1)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)
        reg.release(a, 10)
        backend.slot_freed()
        await asyncio.sleep(0.05)
        assert [w.done() for w in waiting] == [True, False, False]  # the first to wait gets the slot
        late = asyncio.ensure_future(backend.slot(wpb.PREFILL, 1))  # arrives behind the two still waiting
        waiting[1].cancel()  # a cancelled waiter gives up its place
        reg.release(b, 10)
        backend.slot_freed()
        await asyncio.sleep(0.05)
        assert waiting[2].done() and not late.done()
        assert reg.workers(wpb.PREFILL)[0].inflight == 2
        for w in (waiting[0], waiting[2]):
            reg.release(w.result(), 1)
            backend.slot_freed()
        await asyncio.sleep(0.05)
        assert late.done() and reg.workers(wpb.PREFILL)[0].inflight == 1

    on_loop(backend, scenario())


def test_a_new_worker_takes_the_waiters(backend):
    reg = backend.registry

    async def scenario():
        held = [await backend.slot(wpb.PREFILL, 1) for _ in range(2)]
        waiting = [asyncio.ensure_future(backend.slot(wpb.PREFILL, 1)) for _ in range(3)]
        await asyncio.sleep(0.05)
        reg.add(wpb.WorkerInfo(worker_id="prefill-1", role=wpb.PREFILL, address="127.0.0.1:10", pid=2))
        reg.release(held[0], 1)
        backend.slot_freed()  # one release: the waiters fill it and prefill-1
        await asyncio.sleep(0.05)
        assert all(w.done() for w in waiting)
        assert sorted(w.inflight for w in reg.workers(wpb.PREFILL)) == [2, 2]

    on_loop(backend, scenario())


def test_cap_must_be_positive():
    with pytest.raises(ValueError, match="max_prefill_inflight=0"):
        RemoteBackend(Registry(hung_s=None), max_prefill_inflight=0)
