"""Which offline part files are settled (no batch can write them again), and one compaction run over both
feature views (the merging itself: services/features/compaction.py).

The aggregator names a batch's part files `part-<log>-<first position>.parquet` and replaces them when the
batch is folded again, which happens only until the batch's commit is applied and the log's cursor moves past
it. A named part whose first position is at or before its log's cursor is therefore settled. Files written
once under a unique name (the persona job, item ageing: `part-<timestamp>-<uuid>`) and merged files are
settled too. Anything else (a log this store no longer has, after a repartition) is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from services.common.storage import partition_log
from services.common.storage.base import position_order
from services.features import schema as F
from services.features.compaction import COMPACTED_PREFIX, DEFAULT_TARGET_ROWS, CompactionReport, compact_view
from services.profile.repository import ProfileRepository

_POSITION = re.compile(r"\d+(?:-\d+)?")
_ONCE_WRITTEN = re.compile(r"part-\d{8}T\d{12}-[0-9a-f]{8}\.parquet")


def settled_parts(cursors: Mapping[str, str | None]) -> Callable[[str], bool]:
    """A predicate on part file names, given each log's cursor (its last applied position) read beforehand:
    a cursor only moves forward, so a file settled then stays settled."""
    logs = sorted(cursors, key=len, reverse=True)  # "aggregator-1" before "aggregator": the longest prefix

    def settled(name: str) -> bool:
        if name.startswith(COMPACTED_PREFIX) or _ONCE_WRITTEN.fullmatch(name):
            return True
        stem = name.removesuffix(".parquet")
        for log in logs:
            position = stem.removeprefix(f"part-{log}-")
            if position != stem and _POSITION.fullmatch(position):
                cursor = cursors[log]
                return cursor is not None and position_order(position) <= position_order(cursor)
        return False

    return settled


def compact_history(
    repository: ProfileRepository, offline_dir: Path, target_rows: int = DEFAULT_TARGET_ROWS
) -> list[CompactionReport]:
    """Merge the settled small part files of the visitor and item views."""
    logs = [partition_log(p) for p in range(repository.partitions)]
    settled = settled_parts({log: repository.cursor(log) for log in logs})
    return [compact_view(offline_dir, view, settled, target_rows) for view in (F.VISITOR_VIEW, F.ITEM_VIEW)]
