"""Prometheus metrics of one server, in a registry of its own (several servers can live in one
process, as they do in the tests), exposed over HTTP on the metrics port."""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tessera_grpc_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("tessera_grpc_request_seconds", "RPC latency, by method", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("tessera_time_to_first_token_seconds",
                                             "time from a generation request to its first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_generated = Counter("tessera_tokens_generated", "tokens generated", registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "prompt tokens processed", registry=r)
        self.images_encoded = Counter("tessera_images_encoded", "images turned into soft tokens", registry=r)
        self.backend_ready = Gauge("tessera_backend_ready", "1 while the gateway's backend is reachable and "
                                   "SERVING, else 0", ["backend"], registry=r)
        self._server = None
        self._thread = None

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (queue depth, batch size, KV cache use, encoder cache hits...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP exporter (port 0 = off). Returns the bound port, 0 when off."""
        if not port:
            return 0
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
