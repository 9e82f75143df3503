"""Public entry points: prepared rows (cached), sampled and scaled into workloads or requests.

    load_workload("sharegpt", num_requests=1000, seed=0, scale=4)  -> [(prompt_len, output_len)]
    load_requests("humaneval", num_requests=50)                      -> [WorkloadRequest]

The first call for a (name, seed, source_limit) prepares every row (full ShareGPT: ~20 s on two
cores, mostly tokenizing) and caches the lengths as JSON (see cache.py); later calls read the cache
(well under a second). Requests are rebuilt from the data files on demand, texts are not cached.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import random
from collections.abc import Callable, Sequence
from types import ModuleType

from dsjax.workloads import cache, humaneval, longbench, sharegpt
from dsjax.workloads.request import WorkloadRequest, WorkloadRow
from dsjax.workloads.tokenizer import gpt2_tokenizer

# Bump when a preparation rule changes, so old cache files stop matching.
PREPARATION_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """How to prepare one workload's rows and rebuild their prompts."""

    name: str
    prepare: Callable[..., list[WorkloadRow]]
    materialize: Callable[..., list[tuple[str, list[int]]]]
    packages: tuple[str, ...]

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> DatasetSpec:
        return cls(name=name, prepare=module.prepare, materialize=module.materialize, packages=module.PACKAGES)


DATASETS: dict[str, DatasetSpec] = {
    "sharegpt": DatasetSpec.from_module("sharegpt", sharegpt),
    "humaneval": DatasetSpec.from_module("humaneval", humaneval),
    "longbench": DatasetSpec.from_module("longbench", longbench),
}
WORKLOAD_NAMES = tuple(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown workload {name=}; expected one of {WORKLOAD_NAMES}")
    return DATASETS[name]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_common(*, num_requests: int | None, seed: int, scale: float, source_limit: int | None) -> None:
    if num_requests is not None and not (_is_int(num_requests) and num_requests >= 0):
        raise ValueError(f"{num_requests=} must be None or an int >= 0")
    if not _is_int(seed):
        raise ValueError(f"{seed=} must be an int")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1:
        raise ValueError(f"{scale=} must be a number >= 1 (it divides lengths)")
    if source_limit is not None and not (_is_int(source_limit) and source_limit >= 1):
        raise ValueError(f"{source_limit=} must be None or an int >= 1")


def fingerprint(name: str) -> dict[str, object]:
    """What a cached file must match: preparation version and the source packages' versions."""
    spec = _spec(name)
    return {
        "workload": name,
        "preparation_version": PREPARATION_VERSION,
        "packages": {pkg: importlib.metadata.version(pkg) for pkg in spec.packages},
    }


def prepared_rows(name: str, *, seed: int = 0, source_limit: int | None = None) -> list[WorkloadRow]:
    """Every row the dataset yields under the preparation rules, in source order (cached)."""
    spec = _spec(name)
    _check_common(num_requests=None, seed=seed, scale=1, source_limit=source_limit)
    path = cache.workload_cache_path(f"{name}-seed{seed}-{'all' if source_limit is None else source_limit}")
    expected = fingerprint(name)
    payload = cache.read_cached(path, expected)
    if isinstance(payload, list):
        return [WorkloadRow.from_json(item) for item in payload]
    rows = spec.prepare(seed=seed, source_limit=source_limit, tokenizer=gpt2_tokenizer())
    cache.write_cached(path, expected, [row.to_json() for row in rows])
    return rows


def sample_rows(rows: Sequence[WorkloadRow], num_requests: int | None, seed: int) -> list[WorkloadRow]:
    """All rows in source order when `num_requests` is None; else a seeded sample.

    Up to len(rows) requests are drawn without replacement; beyond that, whole shuffled passes
    over the rows are concatenated, so every row appears floor or ceil(num_requests/len(rows)) times.
    """
    if num_requests is None:
        return list(rows)
    if num_requests > 0 and not rows:
        raise ValueError(f"{num_requests=} requested from a workload with no rows")
    rng = random.Random(f"sample:{seed}")
    out: list[WorkloadRow] = []
    while len(out) < num_requests:
        out.extend(rng.sample(list(rows), min(len(rows), num_requests - len(out))))
    return out


def scale_length(length: int, scale: float) -> int:
    """length / scale, rounded down, never below 1."""
    return max(1, int(length / scale))


def load_workload(
    name: str,
    *,
    num_requests: int | None = None,
    seed: int = 0,
    scale: float = 1,
    source_limit: int | None = None,
) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs of a real workload, lengths in GPT-2 BPE tokens.

    name: "sharegpt", "humaneval" or "longbench". num_requests: None for every prepared row in
    source order, else a seeded sample (with repetition past the row count). seed: drives both the
    preparation draws and the sample. scale: divides both lengths (for small CPU models), >= 1.
    source_limit: read only the first N source records (conversations or problems), for tests.
    """
    _check_common(num_requests=num_requests, seed=seed, scale=scale, source_limit=source_limit)
    rows = sample_rows(prepared_rows(name, seed=seed, source_limit=source_limit), num_requests, seed)
    return [(scale_length(r.prompt_len, scale), scale_length(r.output_len, scale)) for r in rows]


def load_requests(
    name: str,
    *,
    num_requests: int | None = None,
    seed: int = 0,
    scale: float = 1,
    source_limit: int | None = None,
) -> list[WorkloadRequest]:
    """The same sample as `load_workload` with the same arguments, with the real prompts.

    With scale > 1 each prompt keeps its first prompt_len/scale tokens; the text is their decoding.
    """
    _check_common(num_requests=num_requests, seed=seed, scale=scale, source_limit=source_limit)
    spec = _spec(name)
    tokenizer = gpt2_tokenizer()
    rows = sample_rows(prepared_rows(name, seed=seed, source_limit=source_limit), num_requests, seed)
    unique = list(dict.fromkeys(rows))
    built = dict(zip(unique, spec.materialize(unique, tokenizer=tokenizer)))
    requests = []
    for row in rows:
        source_id, ids = built[row]
        kept = tuple(ids[: scale_length(row.prompt_len, scale)])
        requests.append(
            WorkloadRequest(
                source_id=source_id,
                prompt=tokenizer.decode(kept),
                prompt_token_ids=kept,
                prompt_len=len(kept),
                output_len=scale_length(row.output_len, scale),
            )
        )
    return requests
