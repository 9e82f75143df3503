"""Scheduling policies as small pure functions over plain numbers.

The engine (scheduler.py, colocated.py, disaggregated.py) and the planner's simulator
(dsjax/planner/instances.py, simulator.py) both call every one of these, so that what the planner
predicts is what the engine does. Nothing here knows about time, devices or requests
beyond their token counts.

Summary of DistServe's online policy (paper section 4.3) as implemented here:
- dispatch: a new request goes to the prefill instance with the least queued work
  (`least_loaded`); a prefilled request goes to the least loaded decode instance.
- prefill batching: FCFS; add requests while the batch's total prompt tokens stay within the
  budget L_m; the head request always runs, alone if it is longer than L_m (`prefill_batch_count`).
- decode pull: a decode instance pulls the next request's KV only if its context plus one block of
  growth per request it runs fits in its free memory and the requests it pulled but could not yet
  batch hold < 5% of its capacity (`decode_should_pull`). Final KV is not reserved, so a decode step
  that does not fit preempts the newest request, to be prefilled again (recompute).
- colocated (vLLM-like): prefill first: if the head of the waiting queue fits, run a prefill batch
  and let decodes stall for that step (`colocated_runs_prefill`).
- chunked (Sarathi-like): every step has a token budget; all running decodes take one token each,
  the rest is filled FCFS with prefill chunks (`chunked_prefill_plan`).
"""

from __future__ import annotations

from typing import Iterable, Sequence


def least_loaded(loads: Sequence) -> int:
    """Index of the smallest load (numbers, or tuples compared in order); ties go to the lowest
    index (deterministic)."""
    if not loads:
        raise ValueError("least_loaded needs at least one load")
    best = 0
    for i in range(1, len(loads)):
        if loads[i] < loads[best]:
            best = i
    return best


def prefill_batch_count(
    prompt_lens: Iterable[int],
    *,
    token_budget: int,
    max_batch_size: int,
    free_kv_tokens: float,
    kv_tokens: Iterable[int] | None = None,
) -> int:
    """How many requests from the head of an FCFS queue form the next prefill batch.

    Adds requests in order while the total prompt tokens stay <= `token_budget` (L_m) and the batch
    has fewer than `max_batch_size` requests. The first request is taken even if it exceeds the
    budget (long prompts run alone). The KV each request reserves (`kv_tokens`, parallel to
    `prompt_lens`; default its prompt) must fit in `free_kv_tokens`; if the head does not fit, the
    answer is 0 and the instance waits for memory (strict FCFS: nothing overtakes the head).
    """
    count = 0
    total = 0
    kv_total = 0
    kv_iter = iter(kv_tokens) if kv_tokens is not None else None
    for length in prompt_lens:
        if count >= max_batch_size:
            break
        if count and total + length > token_budget:
            break
        kv = next(kv_iter) if kv_iter is not None else length
        if kv_total + kv > free_kv_tokens:
            break
        total += length
        kv_total += kv
        count += 1
    return count


def decode_should_pull(
    *, need_tokens: int, free_tokens: float, waiting_tokens: float, capacity_tokens: float, waiting_fraction: float = 0.05
) -> bool:
    """Whether a decode instance pulls one more request's KV from a prefill instance.

    `waiting_tokens`: tokens reserved by requests already pulled but not yet in the running batch.
    DistServe's public rule: pull only while that waiting queue holds < `waiting_fraction` of the
    capacity and there is room for the request.
    """
    return need_tokens <= free_tokens and waiting_tokens < waiting_fraction * capacity_tokens


def colocated_runs_prefill(*, num_waiting: int, head_need_tokens: int, free_tokens: float) -> bool:
    """vLLM's prefill-prioritised rule: run a prefill step whenever the oldest waiting request fits."""
    return num_waiting > 0 and head_need_tokens <= free_tokens


def chunked_prefill_plan(*, num_decodes: int, remaining_prompt: Iterable[int], token_budget: int) -> list[int]:
    """Chunk sizes for the waiting prefills (FCFS) in one chunked-prefill step.

    Each running decode takes one token of the budget first; what is left is handed out in order,
    a request getting min(its remaining prompt, budget left). Returns one size per request served
    (a prefix of `remaining_prompt`); empty if decodes fill the budget.
    """
    budget = token_budget - num_decodes
    chunks: list[int] = []
    for remaining in remaining_prompt:
        if budget <= 0:
            break
        take = remaining if remaining < budget else budget
        chunks.append(take)
        budget -= take
    return chunks
