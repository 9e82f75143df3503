"""Prometheus metrics of the router, and the HTTP endpoint that serves them with a debug view.

    GET /metrics           Prometheus text format
    GET /debug/instances   JSON: every instance's block counts and queues, fetched live

Request metrics follow DistServe's definitions: TTFT = first token - arrival; TPOT = (last token
- first token) / (output tokens - 1), TTFT excluded, and only for requests with two or more
tokens. Instance gauges (free blocks, KV usage, queues) are collected on each scrape from the
backend, so they are never stale. Each server owns its registry (tests start several).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from serving.proto.dsjax.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)
InstancesFn = Callable[[], list[wpb.InstanceStats]]
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _InstanceCollector:
    """Per-instance gauges from a live `instances()` call."""

    def __init__(self, instances: InstancesFn):
        self._instances = instances

    def collect(self):
        try:
            stats = self._instances()
        except Exception as e:  # a scrape must not fail because a worker is slow
            log.warning("instance stats unavailable: %r", e)
            stats = []
        fields = {
            "free_blocks": "Free KV blocks", "num_blocks": "Usable KV blocks", "waiting": "Requests queued (prefill, or room to pull)",
            "running": "Requests decoding", "held": "Prefilled requests whose KV is held under a lease",
            "pulling": "KV transfers in flight into the instance",
            "kv_checksum_failures": "KV pulls refused for a chunk failing its checksum (recomputed), since the worker started",
        }
        families = {f: GaugeMetricFamily(f"dsjax_instance_{f}", doc, labels=["instance", "role"]) for f, doc in fields.items()}
        usage = GaugeMetricFamily("dsjax_instance_kv_usage", "Share of KV blocks in use", labels=["instance", "role"])
        up = GaugeMetricFamily("dsjax_instance_up", "1 if the instance is alive", labels=["instance", "role"])
        for s in stats:
            labels = [s.worker_id, wpb.Role.Name(s.role).lower()]
            for f, fam in families.items():
                fam.add_metric(labels, getattr(s, f))
            usage.add_metric(labels, 1.0 - s.free_blocks / s.num_blocks if s.num_blocks else 0.0)
            up.add_metric(labels, 1.0 if s.alive else 0.0)
        yield from families.values()
        yield usage
        yield up


class ServingMetrics:
    def __init__(self, instances: InstancesFn | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsjax_requests", "Requests finished, by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("dsjax_request_errors", "Requests ended with an error status, by code", ["code"], registry=r)
        self.ttft = Histogram("dsjax_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dsjax_tpot_seconds", "Time per output token after the first", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsjax_e2e_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.active = Gauge("dsjax_router_active_requests", "Requests admitted and not finished (admission queue)", registry=r)
        self.migrations = Counter("dsjax_kv_migrations", "KV transfers between instances", registry=r)
        self.kv_bytes = Counter("dsjax_kv_transfer_bytes", "KV bytes moved between instances", registry=r)
        self.transfer = Histogram("dsjax_kv_transfer_seconds", "Prefill end to KV landed on decode (wait + pull + insert)",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.recomputes = Counter("dsjax_recomputes", "Requests whose KV was lost and recomputed", registry=r)
        if instances is not None:
            r.register(_InstanceCollector(instances))

    def observe_finished(self, reason: str, arrival: float, token_times: list[float], breakdown: dict) -> None:
        self.requests.labels(reason).inc()
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            self.e2e.observe(token_times[-1] - arrival)
        if len(token_times) > 1:
            self.tpot.observe((token_times[-1] - token_times[0]) / (len(token_times) - 1))
        if breakdown.get("kv_bytes"):
            self.migrations.inc()
            self.kv_bytes.inc(breakdown["kv_bytes"])
            self.transfer.observe(breakdown.get("transfer_s", 0.0))
        if breakdown.get("recomputes"):
            self.recomputes.inc(breakdown["recomputes"])

    def text(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A small threaded HTTP server on `port` (0 picks one: see `.port`)."""

    def __init__(self, metrics: ServingMetrics, instances: InstancesFn, port: int, host: str = "127.0.0.1",
                 cluster_token: str | None = None):
        """`/debug/instances` tells what Admin tells (workers' addresses and pids): with a cluster
        token it answers only `Authorization: Bearer TOKEN`, like the cluster's own services.
        `/metrics` stays open to the scraper (counts and latencies, no addresses)."""
        expected = f"Bearer {cluster_token}".encode() if cluster_token else None

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    body, ctype = metrics.text(), "text/plain; version=0.0.4"
                elif self.path.startswith("/debug/instances"):
                    given = (self.headers.get("Authorization") or "").encode()
                    if expected is not None and not hmac.compare_digest(given, expected):
                        self.send_error(401, "internal to the cluster: send Authorization: Bearer $DSJAX_CLUSTER_TOKEN")
                        return
                    stats = [json_format.MessageToDict(s, always_print_fields_with_no_presence=True,
                                                    preserving_proto_field_name=True) for s in instances()]
                    body, ctype = json.dumps({"instances": stats}, indent=1).encode(), "application/json"
                else:
                    self.send_error(404, "try /metrics or /debug/instances")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server_class = ThreadingHTTPServer
        if ":" in host.strip("[]"):  # an IPv6 address such as [::]
            server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self._server = server_class((host.strip("[]"), port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
