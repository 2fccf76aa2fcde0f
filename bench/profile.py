"""Where the CPU goes: py-spy samples of the live services under the benchmark's load.

    make profile        # after `make bench` (reuses its demo world); writes bench/profile.md

The recommend service (2 workers) at 200 req/s and the profile service at 3,000 events/s (batches of 100)
are sampled for 15 s each; samples are grouped by the part of the system they are in, so the numbers say
which part a faster implementation would have to replace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.run import (
    ROOT,
    TMP,
    env_for,
    event_bodies,
    load,
    log,
    recommend_bodies,
    service,
    skip_leftover_events,
)

SECONDS = 15
# A sample is charged to the first part (in this order) that any frame of its stack belongs to: the parts are
# what a faster implementation would replace, so a Redis call counts under the step that made it.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    # recommend
    ("model prediction (lleaves native code)", ("lleaves/",)),
    ("visitor row read (online store, Redis round trip)", ("visitor_row (services/recommend", "consent (services/rec")),
    ("impression logging (background writer thread)", ("_write_loop (services/recommend/repository.py",)),
    ("item cache refresh (background thread)", ("_refresh_loop (services/recommend/service.py",)),
    ("candidate generation", ("services/recommend/ranking/candidates.py",)),
    ("feature matrix", ("services/recommend/ranking/ranker.py", "services/features/item_cache.py")),
    ("business rules", ("services/recommend/ranking/rules.py",)),
    ("experiment assignment and exposure", ("services/experiments/runtime.py", "services/experiments/assignment")),
    ("request parsing, response building, the rest of recommend()", ("services/recommend/",)),
    # profile
    ("Feast online write of feature rows", ("write_to_online_store",)),
    ("offline rows (parquet part files)", ("append_offline",)),
    ("persona assignment", ("services/profile/persona",)),
    ("feature rows and segments", ("services/features/aggregations.py (visitor_features", "visitor_features (")),
    ("fold of events into visitor/item state", ("fold_visitor", "fold_item", "_fold_item_side", "_fold_indexes")),
    ("log read and event decoding", ("open_envelope", "read_log")),
    ("visitor/item state and index storage (Redis)", ("services/profile/repository.py",)),
    ("ingestion: batch validation and durable append", ("services/profile/endpoints.py",)),
    ("aggregator other", ("services/profile/",)),
    # both
    ("HTTP stack (uvicorn, starlette, FastAPI, event loop)", ("uvicorn/", "starlette/", "fastapi/", "asyncio/")),
]
IDLE_FRAMES = ("run (asyncio/runners.py", "_worker (concurrent/futures/thread.py", "wait (threading.py")


def part_of(stack: list[str]) -> str:
    for name, markers in PARTS:
        if any(marker in frame for frame in stack for marker in markers):
            return name
    return "other"


def breakdown(raw: Path) -> dict[str, float]:
    """Share of samples per part, from py-spy's raw (collapsed stack) output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue  # not a sample line
        frames = stack.split(";")
        innermost = frames[-1]
        if any(marker in innermost for marker in IDLE_FRAMES):
            continue  # a thread waiting: the event loop in epoll (uvloop is native code), a pool worker on its queue
        counts[part_of(frames)] += int(number)
    total = sum(counts.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in counts.most_common()}


def record(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy in the background: 100 samples/s for SECONDS, without pausing the process (--nonblocking)."""
    args = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw"]
    args += ["-r", "100", "-d", str(SECONDS), "--nonblocking", "-o", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    marker = TMP / "world" / "bench-world.json"
    if not marker.exists():
        raise SystemExit("run `make bench` first: the profile reuses its demo world")
    world = json.loads(marker.read_text())
    env = env_for("selbench", TMP / "world")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = recommend_bodies(TMP / "recommend.jsonl", world["visitors"])
        with service("recommend", env, workers=2) as (url, process):
            load(f"{url}/v1/recommend", bodies, 100, 3)
            worker = psutil.Process(process.pid).children(recursive=True)[-1].pid
            log("sampling one recommend worker at 200 req/s")
            spy = record(worker, Path(tmp) / "recommend.txt")
            load(f"{url}/v1/recommend", bodies, 200, SECONDS + 2)
            spy.wait()
        results["recommend (one of 2 workers, 200 req/s)"] = breakdown(Path(tmp) / "recommend.txt")

        skip_leftover_events("selbench")
        with service("profile", env) as (url, process):
            batches = event_bodies(
                TMP / "events-profile.jsonl",
                world["visitors"],
                world["items"],
                30 * (SECONDS + 2),
                label=str(time.time()),
            )
            log("sampling the profile service at 3,000 events/s")
            spy = record(process.pid, Path(tmp) / "profile.txt")
            load(f"{url}/v1/events", batches, 30, SECONDS + 2, connections=16)
            spy.wait()
        results["profile (ingestion and aggregator, 3,000 events/s)"] = breakdown(Path(tmp) / "profile.txt")

    lines = ["# Where the CPU goes (py-spy samples under load)", "", "Made by `make profile`.", ""]
    for title, shares in results.items():
        lines += [f"## {title}", "", "| part | share of samples |", "|---|---|"]
        lines += [f"| {name} | {share:.1f}% |" for name, share in shares.items()]
        lines.append("")
    (ROOT / "bench" / "profile.md").write_text("\n".join(lines))
    (ROOT / "bench" / "profile.json").write_text(json.dumps(results, indent=2))
    log("wrote bench/profile.md")


if __name__ == "__main__":
    main()
