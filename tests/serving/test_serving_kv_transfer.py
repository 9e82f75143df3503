"""KV on the wire: chunking, reassembly, re-paging between block sizes, and export/import between
runners of different TP/PP through host bytes (the path a gRPC transfer takes), against the
in-process migration."""

import random

import jax
import numpy as np
import pytest

from dsjax.engine.placement import PhaseParallel, Placement
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.migration import KVDescriptor, export_blocks, import_blocks, migrate
from dsjax.runtime.runner import ModelRunner
from dsjax.runtime.sharding import carve
from serving.kv_transfer import KVAssembler, chunk_plan, repage, to_chunks
from serving.leases import LeaseTable


def desc(num_tokens=37, block_size=8, dtype="float32", layers=3):
    return KVDescriptor(num_layers=layers, num_kv_heads=2, head_dim=4, block_size=block_size, num_tokens=num_tokens, dtype=dtype)


def random_kv(d, seed=0):
    rng = np.random.default_rng(seed)
    shape = (d.num_layers, d.num_blocks, d.num_kv_heads, d.block_size, d.head_dim)
    return rng.standard_normal(shape).astype(d.dtype), rng.standard_normal(shape).astype(d.dtype)


@pytest.mark.parametrize("limit", [1, 200, 512, 1024, 3000, 10**9])
def test_chunk_plan_covers_every_layer_and_block_once(limit):
    d = desc()
    seen = np.zeros((d.num_layers, d.num_blocks), int)
    for l, nl, b, nb in chunk_plan(d, limit):
        seen[l : l + nl, b : b + nb] += 1
        per_block = 2 * d.block_size * d.num_kv_heads * d.head_dim * 4
        assert nl * nb * per_block <= max(limit, per_block)  # at least one block per chunk
    assert (seen == 1).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("limit", [700, 1 << 20])
def test_chunks_round_trip_in_any_order(dtype, limit):
    d = desc(dtype=dtype)
    k, v = random_kv(desc(), 1)
    k, v = k.astype(np.dtype(dtype)), v.astype(np.dtype(dtype))
    chunks = list(to_chunks(d, k, v, limit))
    assert all(c.layout == "LNHSD" and c.count == len(chunks) for c in chunks)
    random.Random(0).shuffle(chunks)
    asm = KVAssembler(d)
    for c in chunks:
        assert not asm.complete
        asm.add(c)
    assert asm.complete and asm.bytes == k.nbytes + v.nbytes
    k2, v2 = asm.arrays()
    assert k2.dtype == np.dtype(dtype) and np.array_equal(k2, k) and np.array_equal(v2, v)


def test_assembler_rejects_bad_chunks():
    d = desc()
    k, v = random_kv(d)
    good = next(to_chunks(d, k, v, 1000))
    for change, msg in [(dict(layout="SNLHD"), "layout"), (dict(num_layers=9), "outside"), (dict(k=b"1234"), "bytes")]:
        bad = type(good)()
        bad.CopyFrom(good)
        for field, value in change.items():
            setattr(bad, field, value)
        with pytest.raises(ValueError, match=msg):
            KVAssembler(d).add(bad)
    with pytest.raises(ValueError, match="describes"):
        KVAssembler(desc(num_tokens=36)).add(good)
    with pytest.raises(ValueError, match="incomplete"):
        KVAssembler(d).arrays()


def test_a_corrupted_chunk_fails_its_checksum():
    """One flipped bit anywhere in K or V, or a wrong checksum, and the chunk is refused before
    any of it lands (the decode worker then fails the pull and the request is recomputed)."""
    d = desc()
    k, v = random_kv(d)
    good = next(to_chunks(d, k, v, 1000))
    for field, at in (("k", 0), ("k", len(good.k) - 1), ("v", len(good.v) // 2), ("checksum", None)):
        bad = type(good)()
        bad.CopyFrom(good)
        if at is None:
            bad.checksum ^= 1
        else:
            data = bytearray(getattr(bad, field))
            data[at] ^= 0x10
            setattr(bad, field, bytes(data))
        asm = KVAssembler(d)
        with pytest.raises(ValueError, match="checksum"):
            asm.add(bad)
        assert asm.bytes == 0 and not asm.complete
    asm = KVAssembler(d)
    asm.add(good)  # the untouched chunk still lands
    assert asm.bytes == len(good.k) + len(good.v)


@pytest.mark.parametrize("src_bs, dst_bs", [(16, 8), (8, 32), (16, 16)])
def test_repage_keeps_every_token(src_bs, dst_bs):
    d = desc(num_tokens=45, block_size=src_bs)
    k, _ = random_kv(d)
    out = repage(k, 45, dst_bs)
    assert out.shape == (d.num_layers, -(-45 // dst_bs), d.num_kv_heads, dst_bs, d.head_dim)
    # token t of head h is row t % BS of block t // BS: [L, H, tokens, D] in logical order
    tokens = lambda x: x.transpose(0, 2, 1, 3, 4).reshape(x.shape[0], x.shape[2], -1, x.shape[4])[:, :, :45]  # noqa: E731
    assert np.array_equal(tokens(out), tokens(k))
    rows = out.transpose(0, 2, 1, 3, 4).reshape(out.shape[0], out.shape[2], -1, out.shape[4])
    assert not rows[:, :, 45:].any()  # the re-cut tail past the last token is zero


def test_lease_table_expires_and_renews():
    now = [0.0]
    leases = LeaseTable(2.0, clock=lambda: now[0])
    leases.hold("a", 1)
    leases.hold("b", 2)
    now[0] = 1.5
    assert leases.renew("a") and not leases.renew("zzz")
    now[0] = 2.5
    assert leases.pop_expired() == [("b", 2)] and "a" in leases
    assert leases.pop("a") == 1 and leases.pop("a") is None and leases.num_expired == 1


CACHE = CacheConfig(num_blocks=24, block_size=8)


def runner(tiny_llama, phase, devices):
    model, params = tiny_llama
    meshes = carve(Placement.colocated(tp=phase.tp, pp=phase.pp), devices)["colocated"][0].meshes
    r = ModelRunner(model, params, CACHE, meshes)
    rng = np.random.default_rng(phase.tp * 10 + phase.pp)
    for s in r.stages:  # a pool full of distinct values, so a misplaced block cannot go unseen
        fill = lambda xs: tuple(jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding) for x in xs)  # noqa: E731
        s.cache = type(s.cache)(k=fill(s.cache.k), v=fill(s.cache.v))
    return r


def pool(r, table):
    """Host K, V of blocks `table` across all stages: [L, n, H, BS, D]."""
    k = np.concatenate([np.stack([np.asarray(x)[table] for x in s.cache.k]) for s in r.stages])
    v = np.concatenate([np.stack([np.asarray(x)[table] for x in s.cache.v]) for s in r.stages])
    return k, v


@pytest.mark.parametrize("src, dst", [(PhaseParallel(tp=2), PhaseParallel(tp=1)), (PhaseParallel(tp=1, pp=2), PhaseParallel(tp=2))])
def test_export_chunks_import_matches_in_process_migration(tiny_llama, src, dst):
    devs = jax.devices()
    a = runner(tiny_llama, src, devs[:2])
    b = runner(tiny_llama, dst, devs[2:4])
    c = runner(tiny_llama, dst, devs[4:6])
    src_table, dst_table = [3, 17, 5, 9, 1, 22, 4], [20, 2, 11, 6, 8, 13, 15]
    cfg = tiny_llama[0].config
    d = KVDescriptor(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     block_size=CACHE.block_size, num_tokens=7 * CACHE.block_size - 3, dtype="float32")
    k, v = export_blocks(a, src_table)
    asm = KVAssembler(d)
    for chunk in to_chunks(d, k, v, max_chunk_bytes=3000):
        asm.add(chunk)
    moved = import_blocks(b, dst_table, *asm.arrays())
    migrate(a, src_table, c, dst_table)
    assert moved == d.nbytes
    want = pool(a, src_table)
    for got in (pool(b, dst_table), pool(c, dst_table)):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
