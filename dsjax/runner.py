"""ModelRunner: one model replica's device state (params, KV pool) and its two programs.

The runner executes whatever batch it is handed; choosing the batch is the scheduler's job. Inputs
are packed on the host (dsjax/batch.py), the jitted program runs with the pool donated, and only
the sampled token ids come back to the host, once per step.
"""

from __future__ import annotations

import numpy as np

from dsjax.batch import Chunk, pack_decode, pack_prefill
from dsjax.kv_cache import CacheConfig, allocate_cache
from dsjax.programs import programs
from dsjax.request import Request
from models.transformer import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, params, cache_config: CacheConfig):
        self.model = model
        self.params = params
        self.cache_config = cache_config
        self.cache = allocate_cache(model.config, cache_config, model.dtype)
        self._prefill, self._decode = programs(model)

    @property
    def block_size(self) -> int:
        return self.cache_config.block_size

    def prefill(self, chunks: list[Chunk], tables: list[list[int]]) -> np.ndarray:
        """Run one packed prefill; returns the sampled token of each chunk ([len(chunks)])."""
        token_ids, meta, sampling = pack_prefill(chunks, tables, self.block_size)
        out, self.cache = self._prefill(self.params, self.cache, token_ids, meta, sampling)
        return np.asarray(out)[: len(chunks)]

    def decode(self, reqs: list[Request], tables: list[list[int]]) -> np.ndarray:
        """Advance each request one token; returns the sampled tokens ([len(reqs)])."""
        token_ids, meta, sampling = pack_decode(reqs, tables, self.block_size)
        out, self.cache = self._decode(self.params, self.cache, token_ids, meta, sampling)
        return np.asarray(out)[: len(reqs)]
