"""Export and erasure of one visitor's offline feature history, measured on a history of many part files.

    python -m bench.offline_history --parts 2000 --rows 200

Writes `--parts` part files of `--rows` visitor rows each through the aggregator's path
(`ProfileRepository.write_visitor_rows`, one part per batch) into the embedded store of a temporary directory,
every row a random one of `--visitors` visitors; each probe visitor gets one row in `--holding` random parts.
Then, per probe: export (`PrivacyRepository.offline_rows`) or erasure (`delete_offline_rows`), timed, with the
part files they read (every `pyarrow.parquet.read_table` call is counted by path). Where the store keeps an
index of the part files, also the first export after the index is deleted (the one-time catch-up a store
written before the index pays). The files are in the page cache in both cases (written just before)."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow.parquet as pq

from services.features import schema as F
from services.features.aggregations import SegmentRules, VisitorState, visitor_features
from services.features.compaction import DEFAULT_TARGET_ROWS, compact_view
from services.profile.privacy.repository import PrivacyRepository
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings
from services.recommend.repository import RecommendRepository

T = TypeVar("T")
START = datetime(2026, 11, 1, tzinfo=UTC)


def templates(count: int) -> list[dict[str, Any]]:
    """Feature rows of varied visitors (the values matter for the file sizes, not for what is measured)."""
    rows = []
    ts = START.timestamp()
    for n in range(count):
        views = [ts + 60 * k for k in range(1 + n % 7)]
        state = VisitorState(f"t{n}", event_count=len(views), first_seen=views[0], last_seen=views[-1], views=views)
        rows.append(visitor_features(state, SegmentRules()))
    return rows


def counting_reads(action: Callable[[], T]) -> tuple[T, float, int]:
    """(result, seconds, distinct part files read) of `action`."""
    read = pq.read_table
    paths: set[str] = set()

    def counted(source: Any, *args: Any, **kwargs: Any) -> Any:
        paths.add(str(source))
        return read(source, *args, **kwargs)

    pq.read_table = counted
    try:
        started = time.perf_counter()
        result = action()
        return result, time.perf_counter() - started, len(paths)
    finally:
        pq.read_table = read


def run(
    parts: int = 2000,
    rows: int = 200,
    visitors: int = 100_000,
    holding: int = 5,
    probes: int = 3,
    target_rows: int = DEFAULT_TARGET_ROWS,
) -> dict[str, Any]:
    rng = random.Random(7)
    results: dict[str, Any] = {
        "parts": parts,
        "rows_per_part": rows,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    probe_ids = [f"probe-{n}" for n in range(2 * probes)]
    placed = {p: rng.sample(range(parts), holding) for p in probe_ids}
    with tempfile.TemporaryDirectory() as tmp:
        namespace = f"oh{uuid.uuid4().hex[:8]}"
        settings = ProfileSettings(
            data_dir=Path(tmp), redis_url=None, namespace=namespace, feast_project=namespace, environment="test"
        )
        profile = ProfileRepository.open(settings)
        try:
            privacy = PrivacyRepository(profile.store, profile.feature_store, settings.offline_dir)
            shapes = templates(50)
            write_s = 0.0
            for part in range(parts):
                at = START + timedelta(minutes=part)
                batch = [
                    {**shapes[r % len(shapes)], F.VISITOR_KEY: f"v{rng.randrange(visitors)}", F.TIMESTAMP_FIELD: at}
                    for r in range(rows)
                ]
                for n, probe in enumerate(p for p, where in placed.items() if part in where):
                    batch[n][F.VISITOR_KEY] = probe
                started = time.perf_counter()
                profile.write_visitor_rows([], batch, part=f"aggregator-{part}")
                write_s += time.perf_counter() - started
            results["write_ms_per_part"] = round(1000 * write_s / parts, 2)

            exports, erasures = [], []
            for probe in probe_ids[:probes]:
                found, seconds, files = counting_reads(partial(privacy.offline_rows, probe))
                exports.append({"ms": round(1000 * seconds, 1), "files_read": files, "rows": len(found)})
            for probe in probe_ids[probes:]:
                (removed, rewritten), seconds, files = counting_reads(partial(privacy.delete_offline_rows, probe))
                erasures.append(
                    {"ms": round(1000 * seconds, 1), "files_read": files, "rows": removed, "files_rewritten": rewritten}
                )
            results["export"] = exports
            results["erasure"] = erasures

            index = settings.offline_dir.resolve() / f".{F.VISITOR_VIEW}.index.sqlite"
            if index.exists():
                results["index_bytes"] = index.stat().st_size
                wal = index.with_name(f"{index.name}-wal")
                results["index_wal_bytes"] = wal.stat().st_size if wal.exists() else 0
                for path in index.parent.glob(f"{index.name}*"):
                    path.unlink()
                found, seconds, files = counting_reads(partial(privacy.offline_rows, probe_ids[0]))
                results["export_rebuilding_the_index"] = {
                    "ms": round(1000 * seconds, 1),
                    "files_read": files,
                    "rows": len(found),
                }
            results["compaction"] = compaction(
                settings.offline_dir.resolve(), privacy, probe_ids[:probes], profile, target_rows
            )
        finally:
            profile.close()
    return results


def point_in_time_join(profile: ProfileRepository, offline_dir: Path, probes: int = 2000) -> float:
    """Seconds of one Feast point-in-time join (DuckDB over the part files) for `probes` visitor rows."""
    frame = pd.DataFrame(
        {
            F.VISITOR_KEY: [f"v{n}" for n in range(probes)],
            "event_timestamp": [START + timedelta(days=3)] * probes,
        }
    )
    recommend = RecommendRepository(profile.store, profile.feature_store, offline_dir)
    started = time.perf_counter()
    recommend._historical(frame, F.visitor_feature_refs(), 100_000)
    return time.perf_counter() - started


def compaction(
    offline_dir: Path,
    privacy: PrivacyRepository,
    probes: list[str],
    profile: ProfileRepository,
    target_rows: int = DEFAULT_TARGET_ROWS,
) -> dict[str, Any]:
    """The history compacted (every file settled: no batch is in flight here): how long it takes, and the
    training join and exports before and after."""
    join_before = point_in_time_join(profile, offline_dir)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = compact_view(offline_dir, F.VISITOR_VIEW, lambda name: True, target_rows)
    seconds = time.perf_counter() - started
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exports = []
    for probe in probes:
        found, export_s, files = counting_reads(partial(privacy.offline_rows, probe))
        exports.append({"ms": round(1000 * export_s, 1), "files_read": files, "rows": len(found)})
    erasures = []
    for visitor in ("v17", "v4242"):  # random visitors, in the merged files now
        (_, rewritten), erase_s, files = counting_reads(partial(privacy.delete_offline_rows, visitor))
        erasures.append({"ms": round(1000 * erase_s, 1), "files_read": files, "files_rewritten": rewritten})
    return {
        "seconds": round(seconds, 2),
        # The process's high-water mark (KiB on Linux) before and after: a rise is the merge's own peak.
        "peak_rss_mb_before": round(peak_before / 1024),
        "peak_rss_mb_after": round(peak_after / 1024),
        "erasure_after": erasures,
        "files_before": report.files_before,
        "files_after": report.files_after,
        "rows_moved": report.rows,
        "join_2000_visitors_s_before": round(join_before, 2),
        "join_2000_visitors_s_after": round(point_in_time_join(profile, offline_dir), 2),
        "export_after": exports,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--visitors", type=int, default=100_000)
    parser.add_argument("--holding", type=int, default=5, help="part files holding each probe visitor")
    parser.add_argument("--probes", type=int, default=3, help="visitors exported, and as many erased")
    parser.add_argument("--target-rows", type=int, default=DEFAULT_TARGET_ROWS, help="rows per merged file")
    args = parser.parse_args()
    print(json.dumps(run(args.parts, args.rows, args.visitors, args.holding, args.probes, args.target_rows), indent=2))


if __name__ == "__main__":
    main()
