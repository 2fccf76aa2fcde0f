"""Recommendations for many visitors at once, for a newsletter or a WhatsApp broadcast.

Each visitor is ranked by the served pipeline (candidates, LightGBM, rules, consent), exactly as
`POST /v1/recommend` would, and gets a `recommendation_id`: links in the message that carry it attribute
clicks and purchases to this list. No experiment is assigned (a broadcast is not a storefront request).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Final

from services.common.catalog import ItemKind
from services.recommend.schemas import RecommendRequest, RequestContext, SlotRequest
from services.recommend.service import RecommendService

COLUMNS: Final = (
    "visitor_id",
    "recommendation_id",
    "position",
    "item_id",
    "title",
    "price",
    "url",
    "image_url",
    "reason",
)


DRAIN_EVERY: Final = 500


class InvalidVisitorFile(ValueError):
    """The visitor list has no `visitor_id` column, or a row without one."""


def read_visitor_ids(handle: IO[str]) -> Iterator[str]:
    """Visitor ids from a CSV with a `visitor_id` column (what `selaras export audience` writes). The header
    is checked at once, before anything is written; rows are read as they are ranked."""
    reader = csv.DictReader(handle)
    if reader.fieldnames is None or "visitor_id" not in [name.strip() for name in reader.fieldnames]:
        raise InvalidVisitorFile("line 1: the file needs a visitor_id column (e.g. from `selaras export audience`)")
    return _unique_ids(reader)


def _unique_ids(reader: csv.DictReader[str]) -> Iterator[str]:
    seen: set[str] = set()
    for row in reader:
        visitor_id = (row.get("visitor_id") or "").strip()
        if not visitor_id:
            raise InvalidVisitorFile(f"line {reader.line_num}: visitor_id is empty")
        if visitor_id not in seen:  # one list per visitor, however often the file names them
            seen.add(visitor_id)
            yield visitor_id


def batch_rows(
    service: RecommendService,
    visitor_ids: Iterable[str],
    kind: ItemKind = ItemKind.PRODUCT,
    count: int = 6,
    channel: str = "email",
) -> Iterator[dict[str, Any]]:
    slot = SlotRequest(name="broadcast", kind=kind, count=count)
    context = RequestContext(channel=channel)
    for n, visitor_id in enumerate(visitor_ids, start=1):
        if n % DRAIN_EVERY == 0:
            # The impression queue is bounded (a full queue drops): let the writer catch up on a long list.
            service.repository.flush(timeout=60.0)
        request = RecommendRequest(visitor_id=visitor_id, context=context, slots=[slot], explain=True)
        answer = service.recommend(request, caller_may_set_time=False, personal_reasons=True)
        for item in answer["slots"][0]["items"]:
            reasons = item.get("reasons") or []
            yield {
                "visitor_id": visitor_id,
                "recommendation_id": answer["recommendation_id"],
                "position": item["position"],
                "item_id": item["item_id"],
                "title": item["title"],
                "price": item.get("price"),
                "url": item.get("url"),
                "image_url": item.get("image_url"),
                "reason": reasons[0] if reasons else "",
            }


def write_csv(rows: Iterable[Mapping[str, Any]], handle: IO[str]) -> int:
    writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    written = 0
    for row in rows:
        writer.writerow({column: "" if row.get(column) is None else row[column] for column in COLUMNS})
        written += 1
    return written
