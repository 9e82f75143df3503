"""What an engine needs from the device side: the `Runner` interface.

The engines in this package decide *which* requests run; a runner runs the batch it is handed and
returns one sampled token per request. `dsjax.runtime.runner.ModelRunner` implements it on JAX
devices; tests plug in fakes. The engines only ever call these members, so they import no jax and
never import the runtime: the runtime imports this package's records (`Request`, `Chunk`) instead,
and the import arrows point runtime -> engine, never back.

Launch/collect split: `launch_*` dispatches work and returns opaque handles at once (JAX dispatch
is asynchronous); `collect` waits for them and copies the sampled tokens to the host, once per
step. With `pp` pipeline stages up to `pp` prefill batches are in flight together.

Overlapped decode (`overlaps_decode`): `launch_decode(..., after=(prev_batch, prev_launched))`
dispatches a step behind one not yet collected; each request of `prev_batch` is one token ahead of
its record, and takes the token `prev_launched` samples for it as input without a host round trip.

KV handoff between two runners of the same model (a prefill and a decode instance): `stage_kv`
gathers a request's blocks out of the pool into arrays of their own, `insert_kv` writes staged
blocks into this runner's pool, and `pull_kv` does both from another runner (resharding when the
two differ in TP or PP). Between processes (serving/prefill_worker.py, decode_worker.py) the
workers also use `kv_descriptor` (what moves), `kv_to_host` / `export_kv` (the sending half),
`import_kv` (the receiving half) and `kv_bytes` (the bytes a request's KV occupies on the device).

Two runners implement it: `dsjax.runtime.runner.ModelRunner` on JAX devices and
`dsjax.runtime.emulated.EmulatedRunner`, which prices each call with a latency profile and sleeps.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from dsjax.engine.request import Chunk, Request


class CacheShape(Protocol):
    num_blocks: int  # KV pool size in blocks, the null block included
    block_size: int  # tokens per block


class Runner(Protocol):
    cache_config: CacheShape

    @property
    def block_size(self) -> int: ...

    @property
    def pp(self) -> int:
        """Pipeline stages: how many prefill batches may be in flight at once."""

    @property
    def fuses_mixed_steps(self) -> bool:
        """Whether a chunked step with decodes and prompt chunks should run as one prefill call
        (True) or as the decode program then the prefill program (False)."""

    def prefill(self, chunks: list[Chunk], tables: list[list[int]], num_decodes: int = 0) -> Sequence[int]: ...

    def decode(self, reqs: list[Request], tables: list[list[int]]) -> Sequence[int]: ...

    def launch_prefill(self, batches: list[tuple[list[Chunk], list[list[int]]]], num_decodes: int = 0) -> list[Any]: ...

    @property
    def overlaps_decode(self) -> bool:
        """Whether `launch_decode` takes `after` (an overlapped decode step)."""

    def launch_decode(self, reqs: list[Request], tables: list[list[int]],
                      after: tuple[list[Request], list[Any]] | None = None) -> list[Any]: ...

    def collect(self, launched: list[Any]) -> list[Sequence[int]]: ...

    def stage_kv(self, table: list[int]) -> Any: ...

    def insert_kv(self, table: list[int], staged: Any, *, wait: bool = True) -> int: ...

    def pull_kv(self, src: "Runner", src_table: list[int], table: list[int]) -> int: ...

    def kv_descriptor(self, num_tokens: int) -> Any: ...

    def kv_bytes(self, num_tokens: int) -> int: ...

    def kv_to_host(self, staged: Any) -> tuple[Any, Any]: ...

    def export_kv(self, table: list[int]) -> tuple[Any, Any]: ...

    def import_kv(self, table: list[int], k: Any, v: Any) -> int: ...
