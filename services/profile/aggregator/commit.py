"""The commit record of one folded micro-batch: every state write the batch makes, stored as one value.

Folding a batch writes many keys (visitor states, item states, candidate indexes, consents) and no store
offers one transaction over all of them (Redis Cluster spreads them over nodes). So the aggregator first
stores the batch's writes as a single record under its log's key (one SET: atomic), then applies them, moves
the cursor and deletes the record. A crash or error at any point leaves either no record (nothing was
written; the batch is folded again from the same state) or a complete record (applied again before anything
else: every write is "set this key to this value", so applying twice equals applying once). Together with
feature rows that are overwrites (online) or replaced part files (offline), a batch takes effect exactly once.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

_HEADER = struct.Struct(">I")


@dataclass
class BatchCommit:
    log: str  # the log (partition) the batch came from
    first: str  # positions of the batch's first and last entries
    last: str
    # namespace -> key -> value, written with `put_many`; `ttls` gives a namespace's expiry (absent: none).
    blobs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    ttls: dict[str, int] = field(default_factory=dict)
    consents: dict[str, bytes] = field(default_factory=dict)  # visitor -> Consent.to_bytes(), saved separately
    withdrawn: list[str] = field(default_factory=list)  # visitors whose profile is deleted
    changed_items: list[str] = field(default_factory=list)  # item ids whose rows were rewritten
    # namespace -> key -> what the batch adds to a record shared by all partitions (item statistics, candidate
    # indexes): merged into the stored value with the log's applied marker (`Store.merge_many`), so applying
    # the record twice adds once and another partition's additions in between are kept.
    merges: dict[str, dict[str, bytes]] = field(default_factory=dict)
    read_at: float = 0.0  # wall time the batch's entries were read: an erasure after it wins (see `_finish`)

    def to_bytes(self) -> bytes:
        """A JSON header (names, lengths) and the values back to back: values are bytes, JSON cannot hold
        them without a base64 copy of every state."""
        layout: list[tuple[str, str, int]] = []
        body: list[bytes] = []
        merges = [(f"__merge__:{namespace}", values) for namespace, values in self.merges.items()]
        for namespace, values in [*self.blobs.items(), ("__consent__", self.consents), *merges]:
            for key, value in values.items():
                layout.append((namespace, key, len(value)))
                body.append(value)
        header = orjson.dumps(
            {
                "log": self.log,
                "first": self.first,
                "last": self.last,
                "ttls": self.ttls,
                "withdrawn": self.withdrawn,
                "changed_items": self.changed_items,
                "read_at": self.read_at,
                "layout": layout,
            }
        )
        return _HEADER.pack(len(header)) + header + b"".join(body)

    @classmethod
    def from_bytes(cls, raw: bytes) -> BatchCommit:
        (size,) = _HEADER.unpack_from(raw)
        header = orjson.loads(raw[_HEADER.size : _HEADER.size + size])
        offset = _HEADER.size + size
        blobs: dict[str, dict[str, bytes]] = {}
        for namespace, key, length in header["layout"]:
            blobs.setdefault(namespace, {})[key] = raw[offset : offset + length]
            offset += length
        if offset != len(raw):
            raise ValueError("commit record is truncated or corrupt")
        consents = blobs.pop("__consent__", {})
        merges = {ns.removeprefix("__merge__:"): blobs.pop(ns) for ns in list(blobs) if ns.startswith("__merge__:")}
        return cls(
            header["log"],
            header["first"],
            header["last"],
            blobs,
            dict(header["ttls"]),
            consents,
            list(header["withdrawn"]),
            list(header["changed_items"]),
            merges,
            float(header.get("read_at", 0.0)),
        )

    def ttl(self, namespace: str) -> int | None:
        return self.ttls.get(namespace)

    def values(self, namespace: str) -> Mapping[str, bytes]:
        return self.blobs.get(namespace, {})
