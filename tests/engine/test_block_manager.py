import random

import pytest

from dsjax.engine.block_manager import NULL_BLOCK, BlockManager, OutOfBlocksError, blocks_for


def test_random_sequences_never_leak_or_double_free():
    rng = random.Random(0)
    for trial in range(20):
        bm = BlockManager(num_blocks=rng.randint(2, 40), block_size=rng.choice([1, 4, 16]))
        start_free = bm.num_free_blocks
        live: dict[str, int] = {}
        for op in range(300):
            choice = rng.random()
            if choice < 0.4:
                rid, n = f"r{trial}-{op}", rng.randint(0, 40)
                if bm.can_allocate(n):
                    table = bm.allocate(rid, n)
                    assert len(table) == blocks_for(n, bm.block_size)
                    live[rid] = n
                else:
                    with pytest.raises(OutOfBlocksError):
                        bm.allocate(rid, n)
                    assert not bm.has(rid) or rid in live
            elif choice < 0.7 and live:
                rid = rng.choice(sorted(live))
                new = live[rid] + rng.randint(0, 20)
                if bm.blocks_needed_to_grow(rid, new) <= bm.num_free_blocks:
                    bm.grow(rid, new)
                    live[rid] = new
                else:
                    before = list(bm.block_table(rid))
                    with pytest.raises(OutOfBlocksError):
                        bm.grow(rid, new)
                    assert bm.block_table(rid) == before  # a failed grow takes nothing
            elif choice < 0.8 and live:
                src = rng.choice(sorted(live))
                dst = f"fork-{trial}-{op}"
                bm.fork(src, dst)
                live[dst] = live[src]
            elif live:
                rid = rng.choice(sorted(live))
                bm.free(rid)
                del live[rid]
            bm.check_invariants()
            for rid in live:
                assert NULL_BLOCK not in bm.block_table(rid)
        for rid in list(live):
            bm.free(rid)
        bm.check_invariants()
        assert bm.num_free_blocks == start_free


def test_shared_blocks_freed_only_by_last_holder():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 9)  # 3 blocks
    bm.fork("a", "b")
    assert bm.num_free_blocks == 4
    assert bm.free("a") == 0
    assert bm.num_free_blocks == 4
    assert bm.free("b") == 3
    assert bm.num_free_blocks == 7


def test_clear_errors():
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(OutOfBlocksError, match="need 4 free KV blocks, only 3"):
        bm.allocate("x", 13)
    bm.allocate("x", 4)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.allocate("x", 1)
    with pytest.raises(ValueError, match="num_blocks=1"):
        BlockManager(num_blocks=1, block_size=4)
    assert bm.free("unknown") == 0  # cancel racing completion is harmless
