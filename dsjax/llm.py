"""The offline API for researchers and tests.

    from dsjax import LLM, SamplingParams
    llm = LLM(model="tiny-llama", dummy_weights=True)
    outs = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling=SamplingParams(max_tokens=16, temperature=0.0))
    outs[0].token_ids  # generated ids only
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp

from dsjax.engine.placement import Placement
from dsjax.engine.request import FinishReason, Lifecycle, Request, validate_prompt
from dsjax.engine.sampling_params import SamplingParams
from models.checkpoints import resolve_model
from dsjax.engine.scheduler import SchedulerConfig
from dsjax.runtime.builder import build_engine, load_causal_lm
from dsjax.runtime.kv_cache import CacheConfig, num_blocks_for_memory
from models.config import ModelConfig
from models.tokenizer import load_tokenizer

_DEFAULT_KV_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    lifecycle: Lifecycle


def default_num_blocks(config: ModelConfig, block_size: int, max_num_seqs: int, dtype_bytes: int) -> int:
    """Room for max_num_seqs full contexts, capped at ~512 MiB of KV, plus the null block."""
    want = max_num_seqs * -(-config.max_position // block_size)
    cap = num_blocks_for_memory(config, block_size, dtype_bytes, _DEFAULT_KV_BYTES)
    return max(2, min(want, cap) + 1)


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dummy_weights: bool = False,
        dtype: str = "float32",
        seed: int = 0,
        block_size: int = 16,
        num_blocks: int | None = None,
        scheduler: SchedulerConfig | None = None,
        attention_backend: str | None = None,
        placement: Placement | None = None,
        mode: str = "colocated",
    ):
        model = resolve_model(model)
        # `weights` holds no arrays: the engine's runners read them, each stage straight onto its devices.
        self.model, weights = load_causal_lm(model, dtype=dtype, dummy_weights=dummy_weights, seed=seed,
                                             backend=attention_backend)
        self.config = self.model.config
        model_dir = Path(model) if Path(model).is_dir() else None
        self.tokenizer = load_tokenizer(model_dir, self.config)
        self.scheduler_config = scheduler or SchedulerConfig()
        if num_blocks is None:
            num_blocks = default_num_blocks(self.config, block_size, self.scheduler_config.max_num_seqs,
                                            jnp.dtype(self.model.dtype).itemsize)
        self.engine = build_engine(
            self.model, weights, placement=placement, mode=mode,
            cache=CacheConfig(num_blocks=num_blocks, block_size=block_size), scheduler=self.scheduler_config,
        )
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of text prompts or token-id prompts; outputs keep the input order."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (text) or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        prompt_token_ids = [list(map(int, p)) for p in prompt_token_ids]
        sampling = sampling or SamplingParams()
        params = [sampling] * len(prompt_token_ids) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompt_token_ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompt_token_ids)} prompts")
        for ids, sp in zip(prompt_token_ids, params):
            validate_prompt(ids, sp, vocab_size=self.config.vocab_size, max_position=self.config.max_position)
        reqs = []
        for ids, sp in zip(prompt_token_ids, params):
            req = Request(
                request_id=f"offline-{next(self._ids)}", prompt_token_ids=ids, sampling=sp,
                seed=sp.seed if sp.seed is not None else random.getrandbits(32), eos_token_ids=self.config.all_eos_token_ids,
            )
            self.engine.add_request(req)
            reqs.append(req)
        while self.engine.has_unfinished():
            self.engine.step()
        return [
            RequestOutput(
                request_id=r.request_id, prompt_token_ids=r.prompt_token_ids, token_ids=list(r.output_token_ids),
                text=self.tokenizer.decode(r.output_token_ids), finish_reason=r.finish_reason, lifecycle=r.lifecycle,
            )
            for r in reqs
        ]
