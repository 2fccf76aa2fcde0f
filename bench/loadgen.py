"""Open-loop HTTP load generator, run in its own process.

Requests are scheduled at fixed times (rate r: request i at t0 + i/r). Latency is measured from the
*scheduled* time, so a slow server cannot slow the generator down and hide its own latency (no coordinated
omission). Connections are persistent HTTP/1.1 sockets on asyncio streams (uvloop when available).

    python -m bench.loadgen --url http://127.0.0.1:8002/v1/recommend --bodies bodies.jsonl --rate 200 --duration 20
prints one JSON object: latencies summary, errors, statuses, achieved throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    started: float = 0.0
    finished: float = 0.0


class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        reused = self.writer is not None
        try:
            return await self._exchange(raw)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            # The server closed a keep-alive connection that sat idle (uvicorn: after 5 s), as it may: send the
            # request again on a new one, as HTTP clients do (posting events is idempotent by event id). At low
            # rates most of the 32 connections idle that long, and these closes were counted as ingest errors.
            self.close()
            return await self._exchange(raw)

    async def _exchange(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def build_request(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    parsed = urlparse(url)
    lines = [
        f"POST {parsed.path or '/'} HTTP/1.1",
        f"Host: {parsed.hostname}:{parsed.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(
    url: str, bodies: list[bytes], rate: float, duration: float, connections: int, headers: dict[str, str]
) -> Outcome:
    parsed = urlparse(url)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(parsed.hostname or "127.0.0.1", parsed.port or 80))
    requests = [build_request(url, body, headers) for body in bodies]
    outcome = Outcome()
    total = int(rate * duration)
    # time.perf_counter, not loop.time(): uvloop's loop clock has millisecond granularity.
    clock = time.perf_counter
    start = clock() + 0.05
    outcome.started = time.time()

    async def one(i: int, scheduled: float) -> None:
        connection = await pool.get()
        try:
            status = await asyncio.wait_for(connection.request(requests[i % len(requests)]), timeout=10)
            key = str(status)
            outcome.statuses[key] = outcome.statuses.get(key, 0) + 1
            if status >= 400:
                outcome.errors += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            outcome.errors += 1
            outcome.statuses["error"] = outcome.statuses.get("error", 0) + 1
            connection.close()
        finally:
            outcome.latencies_ms.append((clock() - scheduled) * 1000)
            pool.put_nowait(connection)

    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    outcome.finished = time.time()
    while not pool.empty():
        pool.get_nowait().close()
    return outcome


def summarize(outcome: Outcome, rate: float) -> dict[str, object]:
    latencies = np.array(outcome.latencies_ms) if outcome.latencies_ms else np.array([np.nan])
    elapsed = max(outcome.finished - outcome.started, 1e-9)
    return {
        "offered_rate": rate,
        "requests": len(outcome.latencies_ms),
        "achieved_rate": round(len(outcome.latencies_ms) / elapsed, 1),
        "errors": outcome.errors,
        "statuses": outcome.statuses,
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p90_ms": round(float(np.percentile(latencies, 90)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "max_ms": round(float(np.max(latencies)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", required=True, type=Path, help="one JSON request body per line")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    args = parser.parse_args()
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    headers = dict(h.split(": ", 1) for h in args.header)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    outcome = asyncio.run(run(args.url, bodies, args.rate, args.duration, args.connections, headers))
    json.dump(summarize(outcome, args.rate), sys.stdout)


if __name__ == "__main__":
    main()
