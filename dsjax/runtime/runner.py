"""ModelRunner: one model instance's device state (params, KV pool) and its programs.

An instance is `pp` pipeline stages, each on its own mesh of `tp` devices with its slice of layers,
its params sharded by the phase's rules and its own KV pool (those layers only). The runner executes
whatever batches it is handed; choosing them is the scheduler's job. Inputs are packed on the host
(dsjax/runtime/batch.py); every micro-batch is dispatched through all stages before any result is read,
so with pp stages up to pp micro-batches are in flight (JAX dispatch is asynchronous, and each
stage's devices work on one micro-batch while the next stage works on the previous one). Only the
sampled token ids come back to the host, once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsjax.engine.request import Chunk, Request
from dsjax.runtime import migration
from dsjax.runtime import sharding as shd
from dsjax.runtime.batch import pack_decode, pack_prefill
from dsjax.runtime.kv_cache import CacheConfig, allocate_cache
from dsjax.runtime.programs import stage_programs
from models.transformer import CausalLM, KVCache
from models.weights import WeightSource

# The widest block table the XLA decode path pads every batch to (4096 tokens of 16-token blocks):
# past it (long-context models) the width is bucketed again, so that per-step host work and
# transfers stay small (the table is B x width int32).
DECODE_TABLE_FLOOR_BLOCKS = 256


@dataclasses.dataclass
class Stage:
    first_layer: int
    last_layer: int
    mesh: Mesh | None  # None: default device, no explicit sharding
    params: dict
    cache: KVCache
    prefill_fn: object
    decode_fn: object

    def put(self, x):
        """Inputs onto this stage's devices, committed: host arrays and device arrays (an
        overlapped decode's tokens, fed from the step in flight) then hit the same compiled
        program (jit keys its cache on whether an argument is committed)."""
        if self.mesh is None:
            return jax.device_put(x, jax.devices()[0])
        return jax.device_put(x, shd.replicated(self.mesh))


class ModelRunner:
    def __init__(self, model: CausalLM, params: WeightSource | dict, cache_config: CacheConfig,
                 meshes: tuple[Mesh, ...] | None = None, rules: shd.ShardingRules | None = None):
        """`params`: a `WeightSource` (each stage loads its own weights from it, tensor by tensor,
        straight onto its mesh; the runner keeps no reference to it) or a params tree in memory
        (each stage's subset resharded onto its mesh)."""
        self.model = model
        self.cache_config = cache_config
        self.stages: list[Stage] = []
        # Called with ("prefill", [(start, end) per chunk]) / ("decode", [context len per request])
        # for every batch launched (serving/step_log.py uses it to time served steps).
        self.launch_hook: Callable[[str, list], None] | None = None
        # Prefill batches whose chunks all start at position 0 attend their own K/V on the jnp path
        # (models/attention.py `_prefill_fresh`); engines that prefill after cached prefixes
        # (chunked) turn it off so that each prefill shape compiles one program.
        self.fresh_prefill = True
        cfg = model.config
        if meshes is None:
            prefill_fn, decode_fn = stage_programs(model, 0, cfg.num_layers)
            cache = allocate_cache(cfg, cache_config, model.dtype)
            if isinstance(params, WeightSource):
                params = params.load()  # every weight, on the default device
            self.stages.append(Stage(0, cfg.num_layers, None, params, cache, prefill_fn, decode_fn))
            return
        for mesh, (first, last) in zip(meshes, shd.stage_layers(cfg.num_layers, len(meshes)), strict=True):
            shd.check_tp(cfg, mesh.size)
            stage_params = shd.shard_stage_params(model, params, mesh, first, last, rules)
            cache = allocate_cache(cfg, cache_config, model.dtype, num_layers=last - first, sharding=shd.cache_sharding(mesh, last - first))
            prefill_fn, decode_fn = stage_programs(model, first, last)
            self.stages.append(Stage(first, last, mesh, stage_params, cache, prefill_fn, decode_fn))

    @property
    def block_size(self) -> int:
        return self.cache_config.block_size

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def fuses_mixed_steps(self) -> bool:
        """A chunked step with decodes and prompt chunks runs as one prefill-program call with the
        Pallas kernels (Sarathi's piggybacking: the decodes share the chunk's weight reads; the
        split attention in models/attention.py), and as the decode program then the prefill
        program on the XLA path, where fusing saves nothing measurable (8 decodes + a 128-token
        chunk: 11.7 ms fused vs 2.7 + 7.6 ms apart, docs/results.md) and every (decodes, chunk)
        combination would be one more compiled shape (2-3 s each on one CPU core)."""
        return self.attends_with_kernels

    @property
    def attends_with_kernels(self) -> bool:
        """The Pallas kernels attend (backend "pallas", or "auto" on GPU); else the jnp path."""
        backend = self.model.backend
        return backend == "pallas" or (backend == "auto" and self.devices()[0].platform == "gpu")

    @property
    def attention_backend(self) -> str:
        """The attention path this runner's programs take, "pallas" or "xla" (what step logs
        record). Exact for a model built with a fixed path, as servers build them
        (builder.platform_backend); with the models' "auto", some shapes may take the other."""
        return "pallas" if self.attends_with_kernels else "xla"

    @property
    def decode_min_blocks(self) -> int:
        """The narrowest block table a decode program is compiled for. The XLA decode loop's trip
        count follows the batch's real lengths, so a wider table costs nothing there: its tables
        cover the model's context (up to DECODE_TABLE_FLOOR_BLOCKS) and one program per batch
        bucket serves every context, 6 decode programs to compile instead of 6 per context
        bucket. The kernels' grid follows the table width, so with them the width is bucketed."""
        if self.attends_with_kernels:
            return 1
        context_blocks = -(-self.model.config.max_position // self.block_size)
        return min(1 << (context_blocks - 1).bit_length(), DECODE_TABLE_FLOOR_BLOCKS)

    def devices(self) -> list:
        if self.stages[0].mesh is None:
            return [jax.devices()[0]]
        return [d for s in self.stages for d in s.mesh.devices.flat]

    def _dispatch(self, packed, decode: bool):
        inputs, meta, sampling = packed
        for stage in self.stages:
            fn = stage.decode_fn if decode else stage.prefill_fn
            # Tracing under the stage's mesh lets the Pallas attention run per device (shard_map).
            with jax.set_mesh(stage.mesh) if stage.mesh is not None else contextlib.nullcontext():
                inputs, stage.cache = fn(stage.params, stage.cache, stage.put(inputs), stage.put(meta), stage.put(sampling))
        return inputs  # [B] sampled tokens (device array, maybe not ready yet)

    def prefill(self, chunks: list[Chunk], tables: list[list[int]], num_decodes: int = 0) -> np.ndarray:
        """Run one packed prefill; returns the sampled token of each chunk ([len(chunks)]). With
        `num_decodes` the first chunks are decodes of a mixed step (dsjax/runtime/batch.py)."""
        return self.collect(self.launch_prefill([(chunks, tables)], num_decodes=num_decodes))[0]

    def launch_prefill(self, batches: list[tuple[list[Chunk], list[list[int]]]],
                       num_decodes: int = 0) -> list[tuple[object, np.ndarray]]:
        """Dispatch prefill batches without waiting: (device tokens, output row of each chunk) per
        batch for `collect` (a mixed batch, `num_decodes` > 0 leading decode chunks in every
        batch, has padding rows between its decodes and its prompts)."""
        if self.launch_hook is not None:
            for chunks, _ in batches:
                self.launch_hook("prefill", [(c.start, c.end) for c in chunks])
        launched = []
        for c, t in batches:
            token_ids, meta, sampling, out_rows = pack_prefill(c, t, self.block_size, num_decodes, fresh_ok=self.fresh_prefill)
            launched.append((self._dispatch((token_ids, meta, sampling), decode=False), out_rows))
        return launched

    def decode(self, reqs: list[Request], tables: list[list[int]]) -> np.ndarray:
        """Advance each request one token ([len(reqs)] tokens)."""
        return np.concatenate(self.collect(self.launch_decode(reqs, tables)))

    @property
    def overlaps_decode(self) -> bool:
        """`launch_decode` takes `after`: a step's input tokens gathered on the device from the
        step in flight (`feed_tokens`)."""
        return True

    def launch_decode(self, reqs: list[Request], tables: list[list[int]],
                      after: tuple[list[Request], list[tuple[object, int]]] | None = None) -> list[tuple[object, int]]:
        """Dispatch one decode step without waiting. With pp stages the batch is split into pp
        micro-batches that flow through the pipeline back to back. `after`: the step in flight
        (its batch and launch); its requests are one token ahead and feed that step's output."""
        prev = {} if after is None else _rows_of(after)
        ahead = [id(r) in prev for r in reqs]
        if self.launch_hook is not None:
            self.launch_hook("decode", [r.num_tokens - 1 + a for r, a in zip(reqs, ahead)])
        n = len(reqs)
        parts = max(1, min(self.pp, n))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        launched = []
        for a, b in zip(bounds, bounds[1:]):
            token_ids, meta, sampling = pack_decode(reqs[a:b], tables[a:b], self.block_size, self.decode_min_blocks, ahead[a:b])
            if any(ahead[a:b]):
                src = np.full(token_ids.shape, -1, np.int32)  # row of the in-flight output, -1: host token
                src[: b - a] = [prev.get(id(r), -1) for r in reqs[a:b]]
                token_ids = feed_tokens(tuple(out for out, _ in after[1]), token_ids, src)
            launched.append((self._dispatch((token_ids, meta, sampling), decode=True), b - a))
        return launched

    @staticmethod
    def collect(launched: list[tuple[object, int | np.ndarray]]) -> list[np.ndarray]:
        """Wait for dispatched steps; the sampled tokens of each (one host copy per step). `rows` is
        the number of leading rows that are real (decode) or the index of each real row (prefill)."""
        return [np.asarray(out)[:rows] if isinstance(rows, int) else np.asarray(out)[rows] for out, rows in launched]

    # ---- KV handoff between instances (dsjax/runtime/migration.py) -----------------------------
    def stage_kv(self, table: list[int]) -> migration.StagedKV:
        """Gather a request's blocks out of this pool (dispatched, not waited for)."""
        return migration.gather_request(self, table)

    def insert_kv(self, table: list[int], staged: migration.StagedKV, *, wait: bool = True) -> int:
        """Write staged blocks into this pool at `table`; returns the bytes moved."""
        return migration.insert_request(self, table, staged, wait=wait)

    def pull_kv(self, src: "ModelRunner", src_table: list[int], table: list[int]) -> int:
        """Copy a request's blocks from runner `src` (same model) into this pool; returns bytes."""
        return migration.migrate(src, src_table, self, table)

    def kv_to_host(self, staged: migration.StagedKV) -> tuple[np.ndarray, np.ndarray]:
        """Host K and V of staged blocks, [L, n, H, BS, D] each (any thread): a transfer's sending half."""
        return migration.staged_to_host(staged)

    def export_kv(self, table: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Host K and V of a request's blocks (`kv_to_host` of `stage_kv`, waited for)."""
        return migration.export_blocks(self, table)

    def import_kv(self, table: list[int], k: np.ndarray, v: np.ndarray) -> int:
        """Write host K and V into blocks `table` (resharded to this runner); returns the bytes."""
        return migration.import_blocks(self, table, k, v)

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of a request's KV of `num_tokens` positions on this runner's devices."""
        return self.kv_descriptor(num_tokens).nbytes

    def kv_descriptor(self, num_tokens: int) -> migration.KVDescriptor:
        """The handoff description of a request's first `num_tokens` positions of KV."""
        cfg = self.model.config
        return migration.KVDescriptor(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            block_size=self.block_size, num_tokens=num_tokens, dtype=np.dtype(self.model.dtype).name,
        )


def _rows_of(after) -> dict[int, int]:
    """id(request) -> its row in the concatenated (padded) outputs of an in-flight decode step."""
    batch, launched = after
    rows, offset, i = {}, 0, 0
    for out, n in launched:
        for j in range(n):
            rows[id(batch[i + j])] = offset + j
        i, offset = i + n, offset + out.shape[0]
    return rows


@jax.jit
def feed_tokens(outs: tuple, host_tokens, src):
    """A decode step's input tokens: row i takes the in-flight step's sampled token at row src[i]
    (its micro-batch outputs concatenated), or host_tokens[i] where src[i] < 0. Placed where that
    step's output lives (the last stage's devices); the next dispatch moves it to the first's."""
    prev = jnp.concatenate(outs)
    return jnp.where(src >= 0, prev[jnp.maximum(src, 0)], host_tokens)
