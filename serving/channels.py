"""gRPC channels between the router and the workers, and between workers (one per address), and
the router's internal listener.

Messages up to 256 MiB are allowed on internal channels (KV chunks are far smaller: see
serving/kv_transfer.py); keepalive pings make a dead peer's connection fail within seconds
instead of hanging. With the cluster's TLS credentials (serving/tls.py), every channel is mutual
TLS: it presents the node certificate and accepts only servers the cluster CA signed.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from serving.cluster_auth import cluster_guard, with_token
from serving.tls import ClusterTLS, bind, dial

MAX_INTERNAL_MESSAGE = 256 << 20
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


class Channels:
    """A thread-safe cache of channels by address; with `token`, every call on them carries the
    cluster token (serving/cluster_auth.py); with `tls`, they are mutual TLS, else plaintext."""

    def __init__(self, token: str | None = None, tls: ClusterTLS | None = None):
        self._token, self._tls = token, tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._raw: dict[str, grpc.Channel] = {}

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                raw = self._raw[address] = dial(address, self._tls, OPTIONS)
                ch = self._channels[address] = with_token(raw, self._token)
            return ch

    def drop(self, address: str) -> None:
        with self._lock:
            self._channels.pop(address, None)
            ch = self._raw.pop(address, None)
        if ch is not None:
            ch.close()

    def close(self) -> None:
        with self._lock:
            chans, self._channels, self._raw = list(self._raw.values()), {}, {}
        for ch in chans:
            ch.close()


class InternalServer:
    """The router's listener for cluster members only (with TLS on, or `--cluster-port`): the
    servicers given (the worker Registry, Admin), mutual TLS with `tls`, the cluster token with
    `token`. The public port then serves only Generate, health and reflection."""

    def __init__(self, servicers, *, host: str, port: int, tls: ClusterTLS | None, token: str | None, max_workers: int = 64):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cluster"),
                                  options=SERVER_OPTIONS, interceptors=[cluster_guard(token)] if token else None)
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
