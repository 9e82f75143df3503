"""The two records a workload is made of: a prepared row (lengths) and a request (with its prompt)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadRow:
    """One prepared (prompt, output) pair, by lengths, plus where its text comes from.

    `locator` is dataset-specific and lets the text be rebuilt without caching it:
    sharegpt `(conversation_index, output_turn)`, humaneval `(task_index,)`,
    longbench `(conversation_index, output_turn, kept_prompt_tokens)`.
    """

    locator: tuple[int, ...]
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.prompt_len=} and {self.output_len=} must both be >= 1")

    def to_json(self) -> list[int]:
        return [self.prompt_len, self.output_len, *self.locator]

    @classmethod
    def from_json(cls, item: list[int]) -> WorkloadRow:
        prompt_len, output_len, *locator = item
        return cls(locator=tuple(locator), prompt_len=prompt_len, output_len=output_len)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadRequest:
    """A request to send: the prompt as text and as GPT-2 BPE ids, and how many tokens to generate.

    `prompt_len == len(prompt_token_ids)` and `prompt == decode(prompt_token_ids)`. When a prompt
    was cut (longbench, or `scale > 1`) the cut may split a multi-byte character, so re-encoding
    `prompt` can differ from `prompt_token_ids` by a token or two: send the ids when exact lengths
    matter. Send with `max_tokens = output_len` and EOS ignored, as DistServe does.
    """

    source_id: str
    prompt: str
    prompt_token_ids: tuple[int, ...]
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len != len(self.prompt_token_ids):
            raise ValueError(f"{self.prompt_len=} != {len(self.prompt_token_ids)=} for {self.source_id=}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.prompt_len=} and {self.output_len=} must both be >= 1")
