"""Compaction of the offline store: many small parquet part files merged into a few large ones.

Every folded batch writes one visitor part and one item part (the file is named after the batch so that folding
it again replaces it: exactly-once). With the aggregator lingering 0.2 s after a batch that was not full, a
partition writes up to ~5 batches a second, so a busy shop adds tens of thousands of files an hour, and every
point-in-time join, export and erasure lists and opens them. Compaction merges the *settled* small files of a
view (files no batch can write again: `settled(name)`, see services/profile/compaction.py) into files of about
`target_rows` rows.

Safety, file by file:
- Under the view's rewrite lock, one group at a time: erasure, retention and the persona back-fill (the other
  rewriters) never see a group half merged, and wait for one group at most.
- The merged file is written under a temporary name (readers glob *.parquet), then swapped in under the view's
  write lock (the aggregator's lock to add or replace a part) and the store's read lock taken exclusively:
  readers that list and read many files (training, export) hold that lock shared, so none lists a file that
  compaction then removes. If readers keep it for `lock_wait_s`, the run stops and leaves the rest for later.
- The view's index (erasure's key -> file map) learns the merged file's keys before the rename and forgets the
  merged files after their removal: it always holds a superset of each file's keys.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from services.common.clock import wall_datetime
from services.features import schema as F
from services.features.offline_index import table_keys
from services.features.schema import view_columns
from services.features.store import (
    OFFLINE_ROW_GROUP_ROWS,
    exclusive_lock_within,
    file_lock,
    offline_index,
    offline_parts,
    offline_read_lock_path,
    rewrite_lock_path,
    write_lock_path,
)

log = logging.getLogger(__name__)

DEFAULT_TARGET_ROWS = 10_000
COMPACTED_PREFIX = "part-compact-"


@dataclass
class CompactionReport:
    view: str
    files_before: int = 0
    files_merged: int = 0  # small files replaced ...
    files_written: int = 0  # ... by this many merged ones
    rows: int = 0  # rows moved
    stopped_busy: bool = False  # readers held the read lock past the wait: the rest is left for the next run
    uncompacted_after: int = 0  # part files as batches wrote them, not merged yet (recent or unsettled ones)

    @property
    def files_after(self) -> int:
        return self.files_before - self.files_merged + self.files_written


def plan_groups(sizes: Sequence[tuple[Path, int]], target_rows: int) -> list[list[Path]]:
    """Consecutive runs of small files (fewer than half the target's rows), each up to about `target_rows` rows;
    a group needs two files at least (merging one file changes nothing)."""
    groups: list[list[Path]] = []
    group: list[Path] = []
    rows = 0
    for path, count in sizes:
        if count >= target_rows // 2:
            continue
        if group and rows + count > target_rows:
            groups.append(group)
            group, rows = [], 0
        group.append(path)
        rows += count
    groups.append(group)
    return [g for g in groups if len(g) >= 2]


def compact_view(
    offline_dir: Path,
    view: str,
    settled: Callable[[str], bool],
    target_rows: int = DEFAULT_TARGET_ROWS,
    lock_wait_s: float = 10.0,
) -> CompactionReport:
    """Merge the view's settled small part files (see the module docstring)."""
    parts = offline_parts(offline_dir, view)
    report = CompactionReport(view, files_before=len(parts))
    sizes = []
    for path in parts:
        if not settled(path.name):
            continue
        try:
            sizes.append((path, pq.ParquetFile(path).metadata.num_rows))
        except FileNotFoundError:
            continue  # removed by a rewriter since the listing
    for group in plan_groups(sizes, target_rows):
        merged = _merge_group(offline_dir, view, group, lock_wait_s)
        if merged is None:
            report.stopped_busy = True
            break
        report.files_merged += merged[0]
        report.files_written += 1 if merged[0] else 0
        report.rows += merged[1]
    report.uncompacted_after = sum(
        1 for p in offline_parts(offline_dir, view) if not p.name.startswith(COMPACTED_PREFIX)
    )
    if report.files_merged:
        log.info(
            "compacted the %s history: %d files into %d (%d rows); %d files now",
            view,
            report.files_merged,
            report.files_written,
            report.rows,
            report.files_after,
        )
    return report


def _merge_group(offline_dir: Path, view: str, group: list[Path], lock_wait_s: float) -> tuple[int, int] | None:
    """(files merged, rows) of one group, or None when the readers held the read lock too long."""
    index = offline_index(offline_dir, view)
    with file_lock(rewrite_lock_path(offline_dir, view)):
        present = [p for p in group if p.exists()]  # another rewriter may have removed one since the listing
        if len(present) < 2:
            return 0, 0
        key, _ = view_columns(view)
        # Sorted by entity, in small row groups: a one-visitor read (export, erasure's probe) skips every row
        # group whose key range misses the visitor (parquet statistics) instead of reading the whole file.
        table = pa.concat_tables([pq.read_table(p) for p in present], promote_options="default").sort_by(
            [(key, "ascending"), (F.TIMESTAMP_FIELD, "ascending")]
        )
        stamp = wall_datetime().strftime("%Y%m%dT%H%M%S%f")
        target = offline_dir / view / f"{COMPACTED_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = target.with_suffix(".compact.tmp")
        pq.write_table(table, tmp, row_group_size=OFFLINE_ROW_GROUP_ROWS)
        keys = table_keys(table, index.key) if index is not None else []
        with exclusive_lock_within(offline_read_lock_path(offline_dir), lock_wait_s) as taken:
            if not taken:
                tmp.unlink()
                return None
            with file_lock(write_lock_path(offline_dir, view)):
                if index is not None:
                    index.add(target.name, keys)
                tmp.rename(target)
                for path in present:
                    path.unlink()
                if index is not None:
                    index.remove([p.name for p in present])
    return len(present), table.num_rows
