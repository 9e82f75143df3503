"""gRPC channels between the router and the workers, and between workers (one per address).

Messages up to 256 MiB are allowed on internal channels (KV chunks are far smaller: see
serving/kv_transfer.py); keepalive pings make a dead peer's connection fail within seconds
instead of hanging.
"""

from __future__ import annotations

import threading

import grpc

from serving.cluster_auth import with_token

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
    """A thread-safe cache of insecure channels by address; with `token`, every call on them
    carries the cluster token (serving/cluster_auth.py)."""

    def __init__(self, token: str | None = None):
        self._token = token
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._raw: dict[str, grpc.Channel] = {}

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                raw = self._raw[address] = grpc.insecure_channel(address, options=OPTIONS)
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
