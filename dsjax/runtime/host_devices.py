"""Fake CPU devices for sharding on one host: XLA reads `--xla_force_host_platform_device_count`
from XLA_FLAGS once, when jax is first imported, so this module must not import jax itself.
Fake devices share the host's cores: they prove sharding, never speed."""

from __future__ import annotations

import os
import sys


def ensure_host_devices(count: int) -> bool:
    """Ask XLA for `count` host devices unless XLA_FLAGS already sets a count or jax is loaded (then
    it is too late). Returns whether the flag was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count <= 1 or "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return True
