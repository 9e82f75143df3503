"""The device side of serving: JAX programs on meshes, for the batches the engine hands over.

    builder.py     the one place a model, its runners and an engine are built for a placement
    runner.py      `ModelRunner`: one instance's params, KV pool and programs (the engine's `Runner`)
    programs.py    the two jitted programs per pipeline stage: prefill and decode (donates the pool)
    batch.py       packs a scheduled batch into the programs' padded inputs and metadata pytrees
    kv_cache.py    the paged KV pool's arrays and sizing
    sharding.py    logical axes -> mesh axes per phase, meshes per instance, pipeline stages
    migration.py   moving one request's KV between two instances' pools (resharding TP/PP)
    kv_descriptor.py  what a request's KV handoff moves (no jax: shared with serving's wire format)
    emulated.py    `EmulatedRunner`: the Runner interface timed by a latency profile, no jax, no arrays
    sampling.py    on-device sampling (greedy, temperature, top-k/p)
    warmup.py      compiling every reachable program shape before serving
"""
