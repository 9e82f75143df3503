"""What the router needs from whatever runs the requests: the seam between the public endpoint
and the engines.

Two implementations: `InProcessBackend` (serving/inprocess.py: one engine from `build_engine` on
this process's devices; KV moves between meshes with device_put) and `RemoteBackend`
(serving/remote.py: prefill and decode worker processes over gRPC). Tests plug in a fake one.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

from dsjax.engine.sampling_params import SamplingParams
from serving.engine_loop import Event, Outbox
from serving.proto.dsjax.v1 import worker_pb2 as wpb


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateJob:
    """A validated request, ready to run."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]  # every id that ends generation; () for none


class Handle(Protocol):
    """A submitted request. Its events come through `outbox` (every backend's do), which the fronts
    read on their event loops (serving/stream_reader.py); `events()` iterates it blocking."""

    outbox: Outbox

    def events(self) -> Iterator[Event]:
        """Blocking: token events, then exactly one FinishEvent or ErrorEvent."""

    def cancel(self) -> None:
        """Abort the request everywhere (idempotent, callable from any thread)."""


class Backend(Protocol):
    def submit(self, job: GenerateJob) -> Handle: ...

    def ready(self) -> bool:
        """Able to serve (engine thread alive; workers of every phase registered)."""

    def instances(self) -> list[wpb.InstanceStats]:
        """Live block counts and queue lengths of every instance (debug endpoint, metrics)."""

    def close(self) -> None: ...
