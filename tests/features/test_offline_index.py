"""The offline index's journal: WAL on a local file system, the rollback journal on a network one (WAL's
shared-memory index is per host, and the Kubernetes offline store is a volume shared by several nodes)."""

from __future__ import annotations

from pathlib import Path

from services.features import schema as F
from services.features.offline_index import OfflineIndex, filesystem_type, journal_mode

MOUNTS = """\
overlay / overlay rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
/dev/sda1 /data ext4 rw,relatime 0 0
nfs.example:/exports/selaras /data/offline nfs4 rw,relatime,vers=4.1 0 0
cephfs@.fs=/ /mnt/ceph ceph rw 0 0
/dev/fuse /mnt/gcs fuse.gcsfuse rw 0 0
/dev/sdb1 /mnt/with\\040space xfs rw 0 0
"""


def test_the_file_system_is_the_longest_mount_point_holding_the_path() -> None:
    assert filesystem_type(Path("/data/offline/visitor_features"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/data/offline"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/data/offline-other"), MOUNTS) == "ext4"  # a sibling, not inside the mount
    assert filesystem_type(Path("/data"), MOUNTS) == "ext4"
    assert filesystem_type(Path("/srv/x"), MOUNTS) == "overlay"
    assert filesystem_type(Path("/mnt/with space/x"), MOUNTS) == "xfs"


def test_network_file_systems_get_the_rollback_journal_and_local_ones_wal() -> None:
    assert journal_mode(Path("/data/offline"), MOUNTS) == "DELETE"
    assert journal_mode(Path("/mnt/ceph/offline"), MOUNTS) == "DELETE"
    assert journal_mode(Path("/mnt/gcs/offline"), MOUNTS) == "DELETE"
    assert journal_mode(Path("/data/local"), MOUNTS) == "WAL"
    assert journal_mode(Path("/srv"), MOUNTS) == "WAL"
    assert journal_mode(Path("/data"), "") == "WAL"  # an unreadable or empty mount table: the local default


def test_an_index_on_this_machines_temporary_folder_uses_wal(tmp_path: Path) -> None:
    index = OfflineIndex(tmp_path, F.VISITOR_VIEW, F.VISITOR_KEY)
    index.add("part-a.parquet", ["v1", "v2"])
    with index._connect() as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == journal_mode(tmp_path).lower()
