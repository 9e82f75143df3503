"""Corrupted KV chunks, injected into a worker process for the chaos soak (tests/support/chaos.py).

Not a package: this folder goes first on the PYTHONPATH of the soak's worker processes only, so
Python imports this module at start-up (`site` imports any `sitecustomize` on the path). With
DSJAX_TEST_CORRUPT_KV=FRACTION it wraps `serving.kv_transfer.to_chunks` (the prefill worker's
`PullKV` encoder) as that module is first imported, so that each chunk, with probability FRACTION,
leaves with one bit of its K or V bytes flipped and its checksum unchanged: what a faulty NIC or a
bad buffer would do on the wire. The receiving decode worker must refuse it (checksum), the router
recompute the request, and the client never see a token decoded from corrupted KV.

    DSJAX_TEST_CORRUPT_KV=0.05            fraction of chunks to corrupt (unset or 0: this module does nothing)
    DSJAX_TEST_CORRUPT_KV_ARM=PATH        corrupt only while PATH exists (the soak's clean run goes first)
    DSJAX_TEST_CORRUPT_KV_LOG=PATH        append "WORKER_ID PID CHUNK_INDEX" per corrupted chunk

Nothing here is installed or imported by serving/ or dsjax/: outside the soak's workers the
serving code runs as shipped.
"""

import os

_FRACTION = float(os.environ.get("DSJAX_TEST_CORRUPT_KV") or 0.0)
_TARGET = "serving.kv_transfer"


def _worker_id() -> str:
    import sys

    argv = sys.argv
    return argv[argv.index("--worker-id") + 1] if "--worker-id" in argv[:-1] else "?"


def _wrap(module) -> None:
    import random

    encode, arm, log_path = module.to_chunks, os.environ.get("DSJAX_TEST_CORRUPT_KV_ARM"), os.environ.get("DSJAX_TEST_CORRUPT_KV_LOG")
    rng, who = random.Random(os.getpid()), f"{_worker_id()} {os.getpid()}"

    def to_chunks(*args, **kwargs):
        for chunk in encode(*args, **kwargs):
            if (arm is None or os.path.exists(arm)) and rng.random() < _FRACTION:
                field = rng.choice(("k", "v"))
                data = bytearray(getattr(chunk, field))
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                    setattr(chunk, field, bytes(data))
                    if log_path:
                        with open(log_path, "a") as f:
                            f.write(f"{who} {chunk.index}\n")
            yield chunk

    to_chunks.__doc__ = encode.__doc__
    module.to_chunks = to_chunks  # before serving.prefill_worker does `from serving.kv_transfer import to_chunks`


def _install() -> None:
    import importlib.abc
    import importlib.machinery
    import sys

    class _Finder(importlib.abc.MetaPathFinder):
        """Finds serving.kv_transfer as the path finder would, and wraps it once it has run."""

        def find_spec(self, name, path, target=None):
            if name != _TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _wrap(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())


if _FRACTION > 0:
    _install()
