"""What a worker accepts from the cluster: every internal request is checked before it reaches
the engine thread (plain Python, no jax).

Cluster members hold the token (and with --tls-dir a certificate), but a bug, a version skew or a
compromised member must not crash a worker, pin its memory or make it dial an arbitrary address
with the cluster's credentials. So each handler checks its message first, and a bad one gets
INVALID_ARGUMENT naming the field (`Invalid`); the worker keeps serving everyone else.

    ids            non-empty, at most MAX_ID_CHARS, printable; at most MAX_IDS_PER_CALL per lease call
    tokens         prompt non-empty, ids in the vocabulary, prompt + output below the context,
                   prompt + max_tokens within it, output shorter than max_tokens (else it is done)
    sampling       SamplingParams' own checks (temperature, top_p, top_k, max_tokens)
    KV descriptor  the count of tokens the request implies, a block size in [1, context], a lease
                   in [0, MAX_LEASE_MS]
    KV source      a registered prefill worker's address (`Peers`: what the router says)
    PullKV         max_chunk_bytes >= 0 (0: the worker's default; over its cap: the cap)

Message sizes: `message_limits` sizes the gRPC limits of a worker to what it really sends and
receives (a request of a whole context, one KV chunk), not to a blanket 256 MiB.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from dsjax.engine.request import Request
from serving.messages import request_from_proto
from serving.proto.dsjax.v1 import worker_pb2 as wpb

MAX_ID_CHARS = 256
MAX_IDS_PER_CALL = 4096
MAX_LEASE_MS = 24 * 3600 * 1000
_MARGIN = 64 << 10  # protobuf framing, sampling fields, stop strings
_BYTES_PER_TOKEN = 10  # two varint-encoded ids (prompt or output) at most 5 bytes each


class Invalid(ValueError):
    """An internal request a worker refuses: INVALID_ARGUMENT, the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerLimits:
    vocab_size: int
    context: int  # prompt + output tokens one request may hold (the scheduler's context length)
    max_chunk_bytes: int  # K + V bytes of the largest KV chunk this worker sends or asks for
    block_bytes: int = 0  # K + V bytes of one block of one layer (the smallest chunk possible)

    @classmethod
    def of(cls, instance, chunk_bytes: int) -> "WorkerLimits":
        """The limits of a PrefillInstance or DecodeInstance (its runner's model and KV layout)."""
        cfg = instance.runner.model.config
        d = instance.runner.kv_descriptor(1)
        return cls(vocab_size=cfg.vocab_size, context=instance.cfg.context_len(cfg.max_position),
                   max_chunk_bytes=chunk_bytes, block_bytes=d.nbytes // max(1, d.num_layers))

    def request_bytes(self) -> int:
        """The largest WorkerRequest a worker of this context needs to receive."""
        return _MARGIN + _BYTES_PER_TOKEN * self.context

    def chunk_message_bytes(self) -> int:
        """The largest KVChunk message: a chunk, or one block of one layer when that is larger."""
        return _MARGIN + max(self.max_chunk_bytes, self.block_bytes)

    def message_bytes(self) -> int:
        return max(self.request_bytes(), self.chunk_message_bytes())


def check_id(rid: str, field: str) -> None:
    if not rid:
        raise Invalid(f"{field} is empty")
    if len(rid) > MAX_ID_CHARS:
        raise Invalid(f"{field} is {len(rid)} characters, over the limit of {MAX_ID_CHARS}")
    if not rid.isprintable():
        raise Invalid(f"{field}={rid[:40]!r} holds unprintable characters")


def check_ids(ids, field: str = "request_ids") -> list[str]:
    ids = list(ids)
    if len(ids) > MAX_IDS_PER_CALL:
        raise Invalid(f"{field} holds {len(ids)} ids, over the limit of {MAX_IDS_PER_CALL} per call")
    for i, rid in enumerate(ids):
        check_id(rid, f"{field}[{i}]")
    return ids


def _check_tokens(ids, vocab_size: int, field: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise Invalid(f"{field} hold ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")


def worker_request(msg: wpb.WorkerRequest, limits: WorkerLimits, *, decode: bool = False) -> Request:
    """A checked WorkerRequest as an engine Request (`decode`: it carries at least the token the
    prefill sampled)."""
    check_id(msg.request_id, "request.request_id")
    prompt, output, ctx = len(msg.prompt_token_ids), len(msg.output_token_ids), limits.context
    if prompt == 0:
        raise Invalid("request.prompt_token_ids is empty")
    if decode and output == 0:
        raise Invalid("request.output_token_ids is empty: a decode starts from the token the prefill sampled")
    if prompt + output >= ctx:
        raise Invalid(f"request.prompt_token_ids + output_token_ids hold {prompt} + {output} tokens, "
                      f"the context is {ctx}")
    for field in ("prompt_token_ids", "output_token_ids", "eos_token_ids"):
        _check_tokens(getattr(msg, field), limits.vocab_size, f"request.{field}")
    _check_tokens(msg.sampling.stop_token_ids, limits.vocab_size, "request.sampling.stop_token_ids")
    try:
        req = request_from_proto(msg)
    except ValueError as e:  # SamplingParams' checks name the field
        raise Invalid(f"request.sampling: {e}") from None
    max_tokens = req.sampling.max_tokens
    if prompt + max_tokens > ctx:
        raise Invalid(f"request.sampling.max_tokens={max_tokens} with a {prompt}-token prompt exceeds the context {ctx}")
    if output >= max_tokens:
        raise Invalid(f"request.output_token_ids hold {output} tokens, not below sampling.max_tokens={max_tokens}")
    return req


def kv_source(source: wpb.KVSource, req: Request, limits: WorkerLimits) -> None:
    """A Decode's KV source, before anything is allocated or dialled (the address is `Peers`')."""
    d = source.kv
    if not source.address:
        raise Invalid("source.address is empty")
    if len(source.address) > MAX_ID_CHARS:
        raise Invalid(f"source.address is {len(source.address)} characters, over the limit of {MAX_ID_CHARS}")
    if d.num_tokens != req.num_tokens - 1:
        raise Invalid(f"source.kv.num_tokens={d.num_tokens}, the request implies {req.num_tokens - 1} "
                      "(prompt + output tokens - 1)")
    if not 1 <= d.block_size <= limits.context:
        raise Invalid(f"source.kv.block_size={d.block_size} must be in [1, {limits.context}]")
    if not 0 <= source.lease_ms <= MAX_LEASE_MS:
        raise Invalid(f"source.lease_ms={source.lease_ms} must be in [0, {MAX_LEASE_MS}]")


def pull_chunk_bytes(request: wpb.PullKVRequest, limits: WorkerLimits) -> int:
    """The chunk size a PullKV streams: the asked size, capped at the worker's own."""
    check_id(request.request_id, "request_id")
    if request.max_chunk_bytes < 0:
        raise Invalid(f"max_chunk_bytes={request.max_chunk_bytes} must be >= 0 (0: the worker's default)")
    return min(request.max_chunk_bytes or limits.max_chunk_bytes, limits.max_chunk_bytes)


class Peers:
    """The prefill workers a decode worker may pull from: the addresses the router lists in its
    replies to Register and Heartbeat. A Decode naming an address not (yet) listed asks for a fresh
    list (the heartbeat loop answers `wanted` at once) and waits for it a little: a prefill worker
    that registered a moment ago is known to the router before any request is routed to it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._addresses: frozenset[str] = frozenset()
        self.wanted = threading.Event()
        self.on_gone = None  # called with each address no longer listed (the decode worker retires its channel)

    def update(self, addresses) -> None:
        with self._cond:
            gone = self._addresses - frozenset(addresses)
            self._addresses = frozenset(addresses)
            self._cond.notify_all()
        if self.on_gone is not None:
            for address in gone:
                self.on_gone(address)

    def allows(self, address: str, wait_s: float = 3.0) -> bool:
        deadline = time.monotonic() + wait_s
        with self._cond:
            while address not in self._addresses:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.wanted.set()
                self._cond.wait(min(left, 0.1))
            return True
