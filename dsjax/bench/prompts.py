"""What the benchmark sends: a workload's real prompts in a form the served model accepts.

The workloads (dsjax/workloads) give each request its real prompt as text and as GPT-2 BPE ids,
with `prompt_len` = the number of BPE ids (after `--scale`). The served model may not speak GPT-2
ids: the dummy-weight presets (tiny-*, small-*) use a 512-entry vocabulary and a byte tokenizer
(ids 0..255 are the UTF-8 bytes, 256 BOS, 257 EOS). So the prompt is sent in one of four forms:

- "bytes" (default): the first `prompt_len` UTF-8 bytes of the real prompt text, as token ids
  0..255. Real text content in the byte tokenizer's own id space, exactly `prompt_len` ids, valid in
  any vocabulary of at least 256 ids. (Every BPE token decodes to at least one byte, so the text
  always has enough bytes; no BOS is prepended.)
- "gpt2": the workload's GPT-2 ids unchanged (needs a vocabulary of at least 50,257, e.g. OPT).
- "random": seeded uniform ids in [0, vocab_size), exactly `prompt_len` of them.
- "text": the prompt text; the server tokenizes it, so the served length follows the server's
  tokenizer (a byte tokenizer sees about four times the BPE count) and `prompt_len` is only nominal.

Every request asks for `max_tokens = output_len`, greedy, with EOS ignored (as DistServe does).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from dsjax.bench.records import BenchRequest
from dsjax.workloads.loader import load_requests
from dsjax.workloads.request import WorkloadRequest

PROMPT_FORMATS = ("bytes", "gpt2", "random", "text")
GPT2_VOCAB_SIZE = 50257


def byte_prompt(text: str, num_tokens: int) -> tuple[int, ...]:
    """The first `num_tokens` UTF-8 bytes of `text` as ids (the text is repeated if too short)."""
    data = text.encode("utf-8") or b" "
    if len(data) < num_tokens:
        data = data * math.ceil(num_tokens / len(data))
    return tuple(data[:num_tokens])


def to_bench_requests(
    requests: Sequence[WorkloadRequest], *, prompt_format: str = "bytes", vocab_size: int | None = None, seed: int = 0
) -> list[BenchRequest]:
    """Converts workload requests into what is sent (see the module docstring for the formats)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{prompt_format=} must be one of {PROMPT_FORMATS}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"{vocab_size=} must be >= 1")
    if prompt_format == "bytes" and vocab_size is not None and vocab_size < 256:
        raise ValueError(f"prompt_format='bytes' sends ids up to 255 but {vocab_size=}")
    if prompt_format == "gpt2" and vocab_size is not None and vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"prompt_format='gpt2' sends GPT-2 ids (< {GPT2_VOCAB_SIZE}) but {vocab_size=}; use 'bytes'")
    if prompt_format == "random" and vocab_size is None:
        raise ValueError("prompt_format='random' needs vocab_size")
    rng = random.Random(f"bench-prompts:{seed}")
    out = []
    for i, req in enumerate(requests):
        ids: tuple[int, ...] | None = None
        text: str | None = None
        if prompt_format == "bytes":
            ids = byte_prompt(req.prompt, req.prompt_len)
        elif prompt_format == "gpt2":
            ids = tuple(req.prompt_token_ids)
        elif prompt_format == "random":
            ids = tuple(rng.randrange(vocab_size) for _ in range(req.prompt_len))  # type: ignore[arg-type]
        else:
            text = req.prompt
        out.append(BenchRequest(index=i, prompt_len=req.prompt_len, output_len=req.output_len,
                                prompt_token_ids=ids, prompt_text=text))
    return out


def load_bench_requests(
    workload: str,
    *,
    num_requests: int,
    seed: int = 0,
    scale: float = 1,
    prompt_format: str = "bytes",
    vocab_size: int | None = None,
    max_total_len: int | None = None,
    source_limit: int | None = None,
) -> list[BenchRequest]:
    """A seeded sample of a real workload (`dsjax.workloads.load_requests`), ready to send.

    max_total_len: the served model's context; a request with prompt_len + output_len above it is
    an error (raise `scale` to shorten the workload), not silently dropped.
    """
    reqs = load_requests(workload, num_requests=num_requests, seed=seed, scale=scale, source_limit=source_limit)
    if max_total_len is not None:
        too_long = [r for r in reqs if r.prompt_len + r.output_len > max_total_len]
        if too_long:
            worst = max(r.prompt_len + r.output_len for r in too_long)
            raise ValueError(
                f"{len(too_long)} of {len(reqs)} {workload} requests exceed {max_total_len=} tokens "
                f"(longest {worst}); use a larger scale"
            )
    return to_bench_requests(reqs, prompt_format=prompt_format, vocab_size=vocab_size, seed=seed)
