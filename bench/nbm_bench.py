"""`/v1/next-best-message:batch` throughput (issue #7 target: ≥ 5,000 visitors/s for batches of 1,000).

Two client threads keep both recommend workers busy; each sends dry-run batches of 1,000 known visitors
(dry runs do not consume frequency caps, so rounds are comparable)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from services.demo.message_sim import bench_nbm_batch


def nbm_batch(url: str, visitors: list[str], runs: int = 3, clients: int = 2) -> dict[str, Any]:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [
                pool.submit(_one_client, url, visitors[i::clients] * 2)  # ≥ 1,000 visitors per batch
                for i in range(clients)
            ]
            results = [f.result() for f in futures]
        seconds = time.perf_counter() - began
        samples.append(
            {
                "visitors_per_s": round(sum(r["visitors"] for r in results) / seconds, 1),
                "batch_p50_ms": statistics.median(r["p50_ms"] for r in results),
                "batch_p99_ms": max(r["p99_ms"] for r in results),
                "sent_share": round(sum(r["sent"] for r in results) / max(sum(r["visitors"] for r in results), 1), 3),
            }
        )
    return {
        "runs": samples,
        "median_visitors_per_s": statistics.median(s["visitors_per_s"] for s in samples),
        "clients": clients,
    }


def _one_client(url: str, visitors: list[str]) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as client:
        result = bench_nbm_batch(client, visitors, channel="push", batch_size=1000, rounds=3)
    return {
        "visitors": result["visitors"],
        "sent": round(result["send_share"] * result["visitors"]),
        "p50_ms": result["batch_ms_p50"],
        "p99_ms": result["batch_ms_p99"],
    }
