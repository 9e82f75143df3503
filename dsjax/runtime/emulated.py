"""An emulated device: the `Runner` interface with a latency profile's clock instead of devices.

`EmulatedRunner` stands in for `ModelRunner` wherever the engines and the serving workers take
one (dsjax/engine/runner_interface.py), so the router, worker processes, scheduler, block manager,
leases and gRPC all run for real while the accelerator is a sleep. No jax, no arrays on devices:
an emulated instance costs a few objects, and a sleeping one no CPU, so dozens fit on one host.

Time. Every call is priced by a `StepCost` (the planner's `LatencyModel` for this instance's model,
TP and PP; built by dsjax/emulate.py, which this module does not import) and queued on the
instance's device timeline, as JAX dispatch queues work on a real device: `launch_*` returns at
once with the time the result will be ready, `collect` sleeps until then. With pp stages a prefill
batch passes stage after stage (`prefill_stage_s` each), so up to pp batches overlap as on a real
pipeline; a decode step or a mixed (chunked) step occupies the whole instance for its modelled
time (`decode_step_s`, `mixed_step_s`). Host time between steps is real: a device whose engine is
late to launch sits idle, as it would.

Tokens. Each sampled token is a deterministic placeholder, a hash of (request id, position) in the
vocabulary, never one of the request's EOS or stop ids: every generation runs to its max_tokens,
so output lengths follow the workload.

KV. The pool is the block manager's bookkeeping over `num_blocks` blocks, sized from the real
model's bytes per token on the emulated device's memory (`emulated_num_blocks`: memory x
utilisation - weights / (TP x PP), the planner's estimate). A request's KV moves as a small
placeholder payload (`kv_descriptor`: one layer, one head, head_dim 1, uint8) through the real
paths, staging, export, the gRPC chunks with their checksums, import, while every byte count
reported (`pull_kv`, `insert_kv`, `import_kv`, `kv_bytes`) is the real model's: K and V of every
layer of whole blocks. A transfer takes bytes / `link_bytes_per_s` (the simulator's link model;
None: free): on the sender's PullKV thread between processes (`kv_to_host`, concurrent with both
instances' steps), and on the receiving instance's timeline in one process (`insert_kv`,
`pull_kv`: the insert is ordered before its next step, as on the real in-process path).

Slow motion. `SlowMotion(cost, k)` prices every step k x (and dsjax/emulate.py divides the link's
bandwidth by k): the cluster runs k x slower in wall time while the host's own time per step stays
what it is, as on a host k x faster once the client rescales time (dsjax/bench/sweep.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dsjax.engine.request import Chunk, Request
from dsjax.runtime.kv_cache import CacheConfig
from dsjax.runtime.kv_descriptor import KVDescriptor
from models.config import ModelConfig

GIB = 1 << 30
A100_80G_BYTES = 80 * GIB  # the planner's a100-80g (dsjax/planner/model_spec.py)
GPU_MEMORY_UTILIZATION = 0.92  # the planner's MemoryModel default (within ~5% of DistServe's table)
PLACEHOLDER_DTYPE = "uint8"
PLATFORM = "emulated"


class StepCost(Protocol):
    """What the emulated runner asks of a latency model (dsjax.planner.latency.LatencyModel)."""

    def prefill_stage_s(self, sum_len: float, sum_len_sq: float, num_seqs: int = 1, max_len: float | None = None) -> float: ...

    def decode_step_s(self, batch_size: int, sum_ctx_plus_1: float, max_ctx_plus_1: float | None = None) -> float: ...

    def mixed_step_s(self, chunk_tokens: int, chunk_quad: float, batch_size: int, sum_ctx_plus_1: float, *,
                     num_chunks: int = 1, chunk_max_keys: float | None = None, decode_max_keys: float | None = None,
                     fused: bool = True) -> float: ...


class SlowMotion:
    """A StepCost whose every time is `factor` x `cost`'s: the emulated cluster in slow motion
    (`serve --emulate-time-scale`). Device time stretches while host time does not, so a host
    too small to drive a cluster at full speed drives it at 1/factor of the speed with
    proportionally less of its own time per emulated second; a client that sends factor x slower
    and divides what it measures by factor (dsjax/bench/sweep.py, `time_scale`) sees the cluster
    at full speed on a host factor x faster."""

    def __init__(self, cost: StepCost, factor: float):
        if not factor > 0:
            raise ValueError(f"time scale {factor} must be > 0")
        self.cost, self.factor = cost, float(factor)

    def prefill_stage_s(self, *args, **kwargs) -> float:
        return self.factor * self.cost.prefill_stage_s(*args, **kwargs)

    def decode_step_s(self, *args, **kwargs) -> float:
        return self.factor * self.cost.decode_step_s(*args, **kwargs)

    def mixed_step_s(self, *args, **kwargs) -> float:
        return self.factor * self.cost.mixed_step_s(*args, **kwargs)


def emulated_num_blocks(config: ModelConfig, *, tp: int, pp: int, block_size: int, dtype_bytes: int,
                        memory_bytes: float = A100_80G_BYTES, utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """KV pool size in blocks (the null block included) of one (tp, pp) instance on emulated
    devices of `memory_bytes` each: per device memory x utilisation - weights / (tp x pp) is left
    for KV, tokens = that x tp x pp / the model's KV bytes per token (the planner's
    `MemoryModel.estimate_tokens`). ValueError when the weights do not fit."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization={utilization} must be in (0, 1]")
    weights = config.num_params() * dtype_bytes
    usable = memory_bytes * utilization - weights / (tp * pp)
    if usable <= 0:
        raise ValueError(f"{config.name}'s {weights / GIB:.1f} GiB of weights over tp={tp} x pp={pp} leave no KV room in "
                         f"{memory_bytes / GIB:.0f} GiB x {utilization} per emulated device: raise tp or pp")
    tokens = int(usable * tp * pp // config.kv_bytes_per_token(dtype_bytes))
    return max(2, tokens // block_size + 1)


@dataclasses.dataclass(frozen=True)
class EmulatedDevice:
    """What `devices()` lists: an id in the emulated cluster (jax's devices have .id and .platform)."""

    id: int
    platform: str = PLATFORM


@dataclasses.dataclass(frozen=True)
class EmulatedModel:
    """Stands in for the Flax module where serving code reads `runner.model` (config, dtype)."""

    config: ModelConfig
    dtype: np.dtype
    backend: str = PLATFORM


@dataclasses.dataclass(frozen=True)
class _Launched:
    ready_at: float  # the emulated clock's time the result exists
    tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class EmulatedStagedKV:
    """A request's blocks as `stage_kv` returns them: only their count (the payload is made on export)."""

    num_blocks: int


class EmulatedRunner:
    def __init__(self, config: ModelConfig, cache_config: CacheConfig, cost: StepCost, *, tp: int = 1, pp: int = 1,
                 dtype: str = "float16", link_bytes_per_s: float | None = None, devices: Sequence[int] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if tp < 1 or pp < 1:
            raise ValueError(f"tp={tp} and pp={pp} must be >= 1")
        if link_bytes_per_s is not None and link_bytes_per_s <= 0:
            raise ValueError(f"link_bytes_per_s={link_bytes_per_s} must be > 0 (None: transfers are free)")
        self.model = EmulatedModel(config, np.dtype(dtype))
        self._model_eos = frozenset(config.all_eos_token_ids)
        self.cache_config = cache_config
        self.cost = cost
        self.tp = tp
        self.link_bytes_per_s = link_bytes_per_s
        ids = list(range(tp * pp)) if devices is None else list(devices)
        if len(ids) != tp * pp:
            raise ValueError(f"{len(ids)} device ids for tp={tp} x pp={pp}")
        self._devices = [EmulatedDevice(i) for i in ids]
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()  # the timeline: launches and inserts may come from two threads
        self._stage_free = [0.0] * pp  # when each pipeline stage finishes what it was given
        self.launch_hook: Callable[[str, list], None] | None = None  # as ModelRunner's (serving/step_log.py)
        self.fresh_prefill = True  # set by builders; changes nothing here
        self.busy_s = 0.0  # modelled device time so far (prefill stage-seconds count once per stage)
        self.bytes_moved = 0  # real-model KV bytes this runner sent or received
        # Host time that held the device: a decode step that continues a request of the previous
        # one could have started when the device went free, and a prompt batch when its first
        # stage went free or its earliest request arrived, whichever is later; the time from then
        # to the launch is the engine's (and its process's) host time, which the simulator can
        # charge (SimConfig.decode_host_s, prefill_host_s).
        self.continued_steps = 0
        self.host_gap_s = 0.0
        self.prefill_launches = 0
        self.prefill_host_gap_s = 0.0
        self._last_decode: set[int] = set()

    # ---- what the engines read -----------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.cache_config.block_size

    @property
    def pp(self) -> int:
        return len(self._stage_free)

    @property
    def fuses_mixed_steps(self) -> bool:
        """A mixed chunked step is one forward pass (Sarathi; the A100 profiles' engines)."""
        return True

    attends_with_kernels = False
    attention_backend = PLATFORM
    decode_min_blocks = 1

    def devices(self) -> list[EmulatedDevice]:
        return list(self._devices)

    # ---- the device timeline ---------------------------------------------------------------------
    def _through_stages(self, stage_s: float, arrived: float | None = None) -> float:
        """Queue one batch through every stage in turn; the time it leaves the last one.
        `arrived`: when its earliest request arrived (this runner's clock)."""
        with self._lock:
            t = self._clock()
            if arrived is not None:
                self._count_prefill(t, max(self._stage_free[0], arrived))
            for k, free in enumerate(self._stage_free):
                t = max(t, free) + stage_s
                self._stage_free[k] = t
            self.busy_s += stage_s * self.pp
            return t

    def _whole_instance(self, seconds: float, continued: bool = False, arrived: float | None = None) -> float:
        """Queue work that holds every stage at once (a decode or mixed step, a KV insert);
        `continued`: a decode step whose requests were ready when the device went free;
        `arrived`: a step with prompts and no such decode, whose earliest request arrived then."""
        with self._lock:
            now, free = self._clock(), max(self._stage_free)
            if continued:
                self.continued_steps += 1
                self.host_gap_s += max(0.0, now - free)
            elif arrived is not None:
                self._count_prefill(now, max(free, arrived))
            end = max(now, free) + seconds
            self._stage_free = [end] * self.pp
            self.busy_s += seconds
            return end

    def _count_prefill(self, now: float, ready: float) -> None:
        self.prefill_launches += 1
        self.prefill_host_gap_s += max(0.0, now - ready)

    def _continues(self, reqs: list[Request]) -> bool:
        """Whether this decode (or mixed) step carries a request of the previous one; remembers
        this step's requests for the next."""
        ids = {id(r) for r in reqs}
        continued = not ids.isdisjoint(self._last_decode)
        self._last_decode = ids
        return continued

    def _arrived(self, chunks: list[Chunk]) -> float:
        """The earliest arrival among the chunks' requests, on this runner's clock (a request's
        lifecycle is stamped with time.perf_counter)."""
        offset = self._clock() - time.perf_counter()
        return offset + min(c.request.lifecycle.arrival for c in chunks)

    def stage_free_in(self) -> float:
        """Seconds until the first pipeline stage can start another prefill batch (0: now). An
        engine that forms its next batch then batches what arrived meanwhile, as the simulator
        does (dsjax/engine/threaded.py)."""
        with self._lock:
            return max(0.0, self._stage_free[0] - self._clock())

    def ready_in(self, launched: list[_Launched]) -> float:
        """Seconds until every launched batch's result exists (0: already)."""
        return max(0.0, max((x.ready_at for x in launched), default=0.0) - self._clock())

    def _wait_until(self, t: float) -> None:
        left = t - self._clock()
        if left > 0:
            self._sleep(left)

    # ---- steps -------------------------------------------------------------------------------------
    def prefill(self, chunks: list[Chunk], tables: list[list[int]], num_decodes: int = 0) -> np.ndarray:
        return self.collect(self.launch_prefill([(chunks, tables)], num_decodes=num_decodes))[0]

    def decode(self, reqs: list[Request], tables: list[list[int]]) -> np.ndarray:
        return np.concatenate(self.collect(self.launch_decode(reqs, tables)))

    def launch_prefill(self, batches: list[tuple[list[Chunk], list[list[int]]]], num_decodes: int = 0) -> list[_Launched]:
        """Queue prefill batches (`num_decodes` leading decode chunks in each: a mixed step)."""
        if self.launch_hook is not None:
            for chunks, _ in batches:
                self.launch_hook("prefill", [(c.start, c.end) for c in chunks])
        out = []
        for chunks, _ in batches:
            tokens = np.array([self.token(c.request, c.end) for c in chunks], np.int64)
            decodes, prompts = chunks[:num_decodes], chunks[num_decodes:]
            if not decodes:
                ready = self._through_stages(self.prefill_stage_s(prompts), self._arrived(prompts) if prompts else None)
            else:
                continued = self._continues([c.request for c in decodes])
                ready = self._whole_instance(self.mixed_step_s(decodes, prompts), continued,
                                             self._arrived(prompts) if prompts else None)
            out.append(_Launched(ready, tokens))
        return out

    overlaps_decode = True  # `launch_decode` takes `after`: the step queues behind the one in flight

    def launch_decode(self, reqs: list[Request], tables: list[list[int]],
                      after: tuple[list[Request], list[_Launched]] | None = None) -> list[_Launched]:
        """Queue one decode step of `reqs` (with pp stages: its pp micro-batches back to back, as
        the latency model prices them). `after`: the step in flight, whose requests are one token
        ahead of their records."""
        ahead = frozenset(map(id, after[0])) if after is not None else frozenset()
        tokens_now = [r.num_tokens + (id(r) in ahead) for r in reqs]  # context + the token fed
        if self.launch_hook is not None:
            self.launch_hook("decode", [n - 1 for n in tokens_now])
        if not reqs:
            return [_Launched(self._clock(), np.zeros(0, np.int64))]
        tokens = np.array([self.token(r, n) for r, n in zip(reqs, tokens_now)], np.int64)
        return [_Launched(self._whole_instance(self.decode_step_s(tokens_now), self._continues(reqs)), tokens)]

    def collect(self, launched: list[_Launched]) -> list[np.ndarray]:
        """Sleep until the launched work is done; the tokens of each launch."""
        if launched:
            self._wait_until(max(x.ready_at for x in launched))
        return [x.tokens for x in launched]

    # ---- pricing (seconds), from the latency model ---------------------------------------------
    def prefill_stage_s(self, chunks: list[Chunk]) -> float:
        """One prompt batch, per stage. A chunk of positions [start, end) after `start` cached ones
        adds end - start tokens and end^2 - start^2 to the quadratic term (a whole prompt: len^2)."""
        if not chunks:
            return 0.0
        sum_len = sum(c.end - c.start for c in chunks)
        sum_sq = sum(c.end * c.end - c.start * c.start for c in chunks)
        return self.cost.prefill_stage_s(sum_len, sum_sq, len(chunks), max(c.end for c in chunks))

    def decode_step_s(self, ctx_plus_1: list[int]) -> float:
        """A decode step over requests of ctx_plus_1 = context + the new token each."""
        return self.cost.decode_step_s(len(ctx_plus_1), sum(ctx_plus_1), max(ctx_plus_1))

    def mixed_step_s(self, decodes: list[Chunk], prompts: list[Chunk]) -> float:
        ends = [c.end for c in decodes]
        return self.cost.mixed_step_s(
            sum(c.end - c.start for c in prompts), sum(c.end * c.end - c.start * c.start for c in prompts),
            len(decodes), sum(ends), num_chunks=len(prompts), chunk_max_keys=max((c.end for c in prompts), default=None),
            decode_max_keys=max(ends), fused=True,
        )

    # ---- tokens ------------------------------------------------------------------------------------
    def token(self, req: Request, position: int) -> int:
        """The placeholder sampled at `position` (0-based) of `req`: a hash of (request id,
        position) in the vocabulary, stepping past the request's EOS and stop ids."""
        vocab = self.model.config.vocab_size
        tok = zlib.crc32(f"{req.request_id}/{position}".encode()) % vocab
        if tok not in self._model_eos and tok not in req.eos_token_ids and tok not in req.sampling.stop_token_ids:
            return tok  # the common case, without building the banned set (one call per token)
        banned = set(req.eos_token_ids) | set(req.sampling.stop_token_ids) | self._model_eos
        for _ in range(len(banned) + 1):
            if tok not in banned:
                return tok
            tok = (tok + 1) % vocab
        raise ValueError(f"every token id of the {vocab}-token vocabulary ends request {req.request_id!r}")

    # ---- KV handoff ----------------------------------------------------------------------------------
    def kv_bytes(self, num_tokens: int) -> int:
        """The real model's K and V bytes of the blocks holding `num_tokens` positions."""
        blocks = -(-num_tokens // self.block_size)
        return blocks * self.block_bytes

    @property
    def block_bytes(self) -> int:
        """K + V bytes of one block, all layers, of the real model."""
        return self.model.config.kv_bytes_per_token(self.model.dtype.itemsize) * self.block_size

    def kv_descriptor(self, num_tokens: int) -> KVDescriptor:
        """The placeholder KV that moves (one byte per token slot): what the wire carries."""
        return KVDescriptor(num_layers=1, num_kv_heads=1, head_dim=1, block_size=self.block_size,
                            num_tokens=num_tokens, dtype=PLACEHOLDER_DTYPE)

    def transfer_s(self, num_blocks: int) -> float:
        """The link model: the real bytes of `num_blocks` blocks / the link's bandwidth."""
        return 0.0 if self.link_bytes_per_s is None else num_blocks * self.block_bytes / self.link_bytes_per_s

    def stage_kv(self, table: list[int]) -> EmulatedStagedKV:
        return EmulatedStagedKV(len(table))

    def insert_kv(self, table: list[int], staged: EmulatedStagedKV, *, wait: bool = True) -> int:
        """Land staged blocks here: the transfer holds this instance before its next step."""
        if len(table) < staged.num_blocks:
            raise ValueError(f"destination table has {len(table)} blocks, source {staged.num_blocks}")
        seconds = self.transfer_s(staged.num_blocks)
        if seconds > 0:
            done = self._whole_instance(seconds)
            if wait:
                self._wait_until(done)
        return self._moved(staged.num_blocks)

    def pull_kv(self, src: "EmulatedRunner", src_table: list[int], table: list[int]) -> int:
        if src.block_size != self.block_size:
            raise ValueError(f"block sizes differ: prefill block_size={src.block_size}, decode block_size={self.block_size}")
        return self.insert_kv(table, src.stage_kv(src_table))

    def kv_to_host(self, staged: EmulatedStagedKV) -> tuple[np.ndarray, np.ndarray]:
        """The sending half of a transfer between processes: sleeps bytes / bandwidth (on the
        caller's thread, the prefill worker's PullKV handler), then returns the placeholder K and V
        ([1, n, 1, block_size, 1] uint8 each, as `kv_descriptor` describes)."""
        self._sleep(self.transfer_s(staged.num_blocks))
        self._moved(staged.num_blocks)
        shape = (1, staged.num_blocks, 1, self.block_size, 1)
        return np.zeros(shape, PLACEHOLDER_DTYPE), np.zeros(shape, PLACEHOLDER_DTYPE)

    def export_kv(self, table: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.kv_to_host(self.stage_kv(table))

    def import_kv(self, table: list[int], k: np.ndarray, v: np.ndarray) -> int:
        """The receiving half: checks the placeholder against the table; returns the real bytes."""
        n = k.shape[1]
        if len(table) < n or k.shape != v.shape or k.shape[2:] != (1, self.block_size, 1):
            raise ValueError(f"placeholder KV {k.shape} / {v.shape} does not fit {len(table)} blocks of {self.block_size}")
        return self._moved(n)

    def _moved(self, num_blocks: int) -> int:
        nbytes = num_blocks * self.block_bytes
        with self._lock:
            self.bytes_moved += nbytes
        return nbytes


def emulated_cache(config: ModelConfig, *, tp: int, pp: int, block_size: int, dtype_bytes: int,
                   num_blocks: int | None = None, **memory: Any) -> CacheConfig:
    """The pool of one emulated instance: `num_blocks` when given, else what the memory holds."""
    n = num_blocks or emulated_num_blocks(config, tp=tp, pp=pp, block_size=block_size, dtype_bytes=dtype_bytes, **memory)
    return CacheConfig(num_blocks=n, block_size=block_size)
