"""gRPC channels between the router and the workers, and between workers (one per address), and
the router's internal listener.

Internal messages are limited to what the cluster really sends (`max_message`: a worker's is
sized by serving/worker_checks.py to one KV chunk or one request of a whole context, the router's
to a request; the defaults fit the default 1 MiB chunks); keepalive pings make a dead peer's
connection fail within seconds instead of hanging. With the cluster's TLS credentials
(serving/tls.py), every channel is mutual TLS: it presents the node certificate and accepts only
servers the cluster CA signed. Channels to workers that left are closed after a grace period
(`retire`): workers restarted on new ports would otherwise leave one each behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import grpc.aio

from serving.cluster_auth import METADATA_KEY, cluster_guard, server_interceptors, with_token
from serving.tls import ClusterTLS, bind, dial

MAX_INTERNAL_MESSAGE = 8 << 20  # the default: 1 MiB KV chunks, requests of up to ~800k tokens
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_INTERNAL_MESSAGE),
    ("grpc.max_send_message_length", MAX_INTERNAL_MESSAGE),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_INTERNAL_MESSAGE),
    ("grpc.max_send_message_length", MAX_INTERNAL_MESSAGE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


def with_message_limit(options: list, size: int) -> list:
    """gRPC `options` with both message limits set to `size` bytes."""
    keep = [(k, v) for k, v in options if k not in ("grpc.max_receive_message_length", "grpc.max_send_message_length")]
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size), *keep]


class Channels:
    """A thread-safe cache of channels by address; with `token`, every call on them carries the
    cluster token (serving/cluster_auth.py); with `tls`, they are mutual TLS, else plaintext.
    `aio(address, loop)` gives the asyncio channel of one event loop (the remote backend's): its
    calls carry the token only when they pass `metadata`."""

    def __init__(self, token: str | None = None, tls: ClusterTLS | None = None, max_message: int | None = None):
        self._token, self._tls = token, tls
        self._options = OPTIONS if max_message is None else with_message_limit(OPTIONS, max_message)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._raw: dict[str, grpc.Channel] = {}
        self._aio: dict[tuple[str, asyncio.AbstractEventLoop], grpc.aio.Channel] = {}
        self._retired: list[tuple[float, object]] = []  # (close at, channel or (aio channel, its loop))
        self.metadata = ((METADATA_KEY, token),) if token else ()  # for calls on the aio channels

    def get(self, address: str) -> grpc.Channel:
        self.close_retired()
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                raw = self._raw[address] = dial(address, self._tls, self._options)
                ch = self._channels[address] = with_token(raw, self._token)
            return ch

    def aio(self, address: str, loop: asyncio.AbstractEventLoop) -> grpc.aio.Channel:
        """The asyncio channel to `address` on `loop` (call it on that loop's thread)."""
        self.close_retired()
        with self._lock:
            ch = self._aio.get((address, loop))
            if ch is None:
                if self._tls is None:
                    ch = grpc.aio.insecure_channel(address, options=self._options)
                else:
                    ch = grpc.aio.secure_channel(address, self._tls.channel_credentials(), options=self._options)
                self._aio[(address, loop)] = ch
            return ch

    def _pop_aio(self, address: str) -> list:
        keys = [k for k in self._aio if k[0] == address]
        return [(self._aio.pop(k), k[1]) for k in keys]

    def drop(self, address: str) -> None:
        with self._lock:
            self._channels.pop(address, None)
            ch = self._raw.pop(address, None)
            aio = self._pop_aio(address)
        if ch is not None:
            ch.close()
        for pair in aio:
            _close(pair)

    def retire(self, address: str, grace_s: float = 60.0) -> None:
        """Forget `address` (its worker left) and close its channel after `grace_s`, when no call
        started on it before can still need it: workers that restart on new ports would otherwise
        leave one channel each behind, for good."""
        with self._lock:
            self._channels.pop(address, None)
            ch = self._raw.pop(address, None)
            if ch is not None:
                self._retired.append((time.monotonic() + grace_s, ch))
            self._retired += [(time.monotonic() + grace_s, pair) for pair in self._pop_aio(address)]
        self.close_retired()

    def __len__(self) -> int:
        with self._lock:
            return len(self._raw)

    def close_retired(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._retired or self._retired[0][0] > now:
                return
            due = [ch for t, ch in self._retired if t <= now]
            self._retired = [(t, ch) for t, ch in self._retired if t > now]
        for ch in due:
            _close(ch)

    def close(self) -> None:
        with self._lock:
            chans, self._channels, self._raw = list(self._raw.values()), {}, {}
            chans += [ch for _, ch in self._retired] + [(ch, loop) for (_, loop), ch in self._aio.items()]
            self._retired, self._aio = [], {}
        for ch in chans:
            _close(ch)


def _close(ch) -> None:
    """Close a channel, or an (aio channel, loop) pair on its loop (unless that loop is gone)."""
    if not isinstance(ch, tuple):
        ch.close()
        return
    ch, loop = ch
    if not loop.is_closed():
        try:
            asyncio.run_coroutine_threadsafe(ch.close(), loop)
        except RuntimeError:  # the loop stopped meanwhile
            pass


class InternalServer:
    """The router's listener for cluster members only (with TLS on, or `--cluster-port`): the
    servicers given (the worker Registry, Admin), mutual TLS with `tls`, the cluster token with
    `token`. The public port then serves only Generate, health and reflection."""

    def __init__(self, servicers, *, host: str, port: int, tls: ClusterTLS | None, token: str | None, max_workers: int = 64):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cluster"),
                                  options=SERVER_OPTIONS,
                                  interceptors=server_interceptors(cluster_guard(token) if token else None))
        for add, servicer in servicers:
            add(servicer, self.server)
        self.port = bind(self.server, f"{host}:{port}", tls)
        if self.port == 0:
            raise RuntimeError(f"could not bind the cluster listener to {host}:{port}")

    def start(self) -> "InternalServer":
        self.server.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
