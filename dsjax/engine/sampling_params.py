"""Per-request sampling and stopping parameters (validated at the public boundary)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 disables top-k; top_p 1.0 disables nucleus sampling. `seed`
    makes sampling reproducible per request (the key for output token i is fold_in(seed, i)); None
    draws one. Generation stops at `max_tokens`, at any id in `stop_token_ids`, at a `stop` string,
    or at the model's EOS unless `ignore_eos`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(str(s) for s in self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature={self.temperature!r} must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be in [0, 2**32)")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
