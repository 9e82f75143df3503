"""Paged KV block allocation, in plain Python (no device code).

The pool has `num_blocks` blocks of `block_size` token slots. Block 0 is the null block (see
models/attention.py): it is never handed out, so usable capacity is num_blocks - 1 blocks. Each
request owns a block table, the list of its physical block ids in logical order; position p of
the request lives in table[p // block_size], row p % block_size. Blocks carry reference counts so
that a block can be shared (a forked request, or a block a transfer still reads) and returns to
the free list only when its last holder lets go.
"""

from __future__ import annotations

from collections import deque

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation needs more free blocks than the pool has."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} must be >= 2 (block 0 is reserved)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.capacity_blocks - self.num_free_blocks

    def has(self, req_id: str) -> bool:
        return req_id in self._tables

    def block_table(self, req_id: str) -> list[int]:
        return self._tables[req_id]

    def num_tokens(self, req_id: str) -> int:
        return self._num_tokens[req_id]

    def can_allocate(self, num_tokens: int, reserve_blocks: int = 0) -> bool:
        return blocks_for(num_tokens, self.block_size) + reserve_blocks <= self.num_free_blocks

    def blocks_needed_to_grow(self, req_id: str, new_total_tokens: int) -> int:
        return max(0, blocks_for(new_total_tokens, self.block_size) - len(self._tables[req_id]))

    # ---- mutation ------------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} free KV blocks, only {len(self._free)} of {self.capacity_blocks} are free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            assert self._refs[b] == 0, f"block {b} on the free list with refcount {self._refs[b]}"
            self._refs[b] = 1
        return out

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Give a new request room for `num_tokens` tokens; returns its block table."""
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already holds blocks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        self._tables[req_id] = self._take(blocks_for(num_tokens, self.block_size))
        self._num_tokens[req_id] = num_tokens
        return self._tables[req_id]

    def grow(self, req_id: str, new_total_tokens: int) -> list[int]:
        """Extend a request's table to hold `new_total_tokens` tokens (append slots)."""
        table = self._tables[req_id]
        if new_total_tokens < self._num_tokens[req_id]:
            raise ValueError(f"cannot shrink {req_id!r} from {self._num_tokens[req_id]} to {new_total_tokens} tokens")
        table.extend(self._take(self.blocks_needed_to_grow(req_id, new_total_tokens)))
        self._num_tokens[req_id] = new_total_tokens
        return table

    def fork(self, src_id: str, dst_id: str) -> list[int]:
        """Share all of src's blocks with a new request dst (reference counted)."""
        if dst_id in self._tables:
            raise ValueError(f"request {dst_id!r} already holds blocks")
        table = list(self._tables[src_id])
        for b in table:
            self._refs[b] += 1
        self._tables[dst_id] = table
        self._num_tokens[dst_id] = self._num_tokens[src_id]
        return table

    def free(self, req_id: str) -> int:
        """Drop a request's references; returns how many blocks went back to the free list.

        Freeing an unknown request is a no-op (cancel paths may race with completion).
        """
        table = self._tables.pop(req_id, None)
        self._num_tokens.pop(req_id, None)
        if table is None:
            return 0
        released = 0
        for b in table:
            assert self._refs[b] > 0, f"double free of block {b} by {req_id!r}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
                released += 1
        return released

    def check_invariants(self) -> None:
        """Every block is either free (ref 0) or referenced exactly as often as tables hold it."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                counts[b] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block on the free list"
        assert NULL_BLOCK not in free and counts[NULL_BLOCK] == 0, "null block handed out"
        for b in range(1, self.num_blocks):
            assert counts[b] == self._refs[b], f"block {b}: refcount {self._refs[b]} but {counts[b]} holders"
            assert (b in free) == (counts[b] == 0), f"block {b}: free={b in free} holders={counts[b]}"
