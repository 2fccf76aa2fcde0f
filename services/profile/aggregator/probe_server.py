"""/healthz, /readyz and /metrics of a standalone aggregator process (`selaras run aggregator`).

A plain threaded HTTP server: the aggregator has no API, and a web framework would cost start time and memory
for three fixed answers."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from services.common.observability import metrics_payload
from services.profile.aggregator.worker import Aggregator


def serve_probes(host: str, port: int, aggregator: Aggregator) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; `shutdown()` the returned server to stop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server dispatches to
            if self.path == "/healthz":
                self._send(200, b'{"status":"alive"}', "application/json")
            elif self.path == "/readyz":
                # Ready while the folding thread runs and the store answers, also as a standby (no lease).
                store_ok = aggregator.repository.store.ping()
                ready = store_ok and aggregator.alive
                body = {
                    "ready": ready,
                    "store": store_ok,
                    "aggregator": aggregator.alive,
                    "holds_lease": bool(aggregator.held_partitions()),
                    "partitions": aggregator.held_partitions(),
                    "lag_s": aggregator.lag_s,
                    "error": aggregator.last_error,
                }
                self._send(200 if ready else 503, orjson.dumps(body), "application/json")
            elif self.path == "/metrics":
                payload, content_type = metrics_payload()
                self._send(200, payload, content_type)
            else:
                self._send(404, b'{"error":"not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds would flood the log."""

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
