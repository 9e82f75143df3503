"""Locate DistServe's published A100 reference data (shared/reference/distserve-a100) for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
_NAME = Path("reference") / "distserve-a100"


def reference_dir() -> Path:
    """The folder with profiler-a100-80g.*.json and max_num_tokens.csv; skips the test if absent."""
    candidates = []
    if os.environ.get("DSJAX_SHARED"):
        candidates.append(Path(os.environ["DSJAX_SHARED"]) / _NAME)
    candidates += [_REPO / "shared" / _NAME, _REPO.parent / "shared" / _NAME]
    for c in candidates:
        if (c / "profiler-a100-80g.distserve.json").is_file():
            return c
    pytest.skip(f"DistServe reference data not found in {[str(c) for c in candidates]}")


def distserve_profile() -> Path:
    return reference_dir() / "profiler-a100-80g.distserve.json"


def vllm_profile() -> Path:
    return reference_dir() / "profiler-a100-80g.vllm.json"


def max_num_tokens_csv() -> Path:
    return reference_dir() / "max_num_tokens.csv"
