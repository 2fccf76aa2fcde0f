"""The lease that makes an aggregator its log's single consumer.

Two processes folding the same log would each read the same cursor and states and race each other's
writes (the HTTP API with `--workers`, a second `selaras run aggregator`, an import running next to the live
service). The aggregator therefore folds only while it holds its log's lease: a key taken with `SET NX PX`
(Redis) or a lock row (SQLite) that expires unless its holder renews it, which it does before every batch and
again before committing one. A holder that dies or hangs loses the lease after `ttl_s`; a standby takes it
over and starts from what is stored (the commit record of an unfinished batch first)."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid

from services.common.errors import StorageUnavailable
from services.common.storage import Store

DEFAULT_TTL_S = 10.0


def holder_name() -> str:
    """Unique per process and instance, readable in the logs: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    def __init__(self, store: Store, name: str, ttl_s: float = DEFAULT_TTL_S, holder: str | None = None):
        self.store = store
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or holder_name()
        self.held = False
        self.acquired = False  # the last `hold` took the lease (it was not held before): caches are stale

    def hold(self) -> bool:
        """Take or renew the lease; True while this instance holds it."""
        was_held = self.held
        try:
            self.held = self.store.acquire_lease(self.name, self.holder, self.ttl_s)
        except StorageUnavailable:
            self.held = False  # it may expire meanwhile: taking it again must count as a new acquisition
            raise
        self.acquired = self.held and not was_held
        return self.held

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(StorageUnavailable):  # it expires by itself
                self.store.release_lease(self.name, self.holder)

    def current_holder(self) -> str | None:
        return self.store.lease_holder(self.name)
