"""Histories files ("user item item ...") and item attributes become catalog items and purchase events."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from services.common.catalog import MAX_TAGS, CatalogItem
from services.common.events import EventType
from services.profile.importer import EVENT_ADAPTER, ITEM_ADAPTER, read_jsonl
from services.profile.sequences import (
    SequenceFileError,
    catalog_items,
    purchase_events,
    read_histories,
    write_jsonl,
)


def write_files(tmp_path: Path) -> tuple[Path, Path]:
    histories = tmp_path / "Shop.txt"
    histories.write_text("1 10 11 12\n2 11 12\n\n3 12 10 13 11\n")
    attributes = tmp_path / "Shop_item2attributes.json"
    # Attribute 1 is on every item (the catalog's root); item 10 carries 45 attributes, more than 30.
    attributes.write_bytes(
        orjson.dumps({"10": [1, 5, *range(100, 143), 7], "11": [1, 8], "12": [1, 6], "13": [1, 9, 3]})
    )
    return histories, attributes


def test_histories_become_products_with_category_brand_and_every_specific_tag(tmp_path: Path) -> None:
    histories = read_histories(*write_files(tmp_path))
    assert histories.users == ["1", "2", "3"]
    assert histories.sequences[2] == ["12", "10", "13", "11"]
    items = {item.item_id: item for item in catalog_items(histories)}
    assert set(items) == {"10", "11", "12", "13"}
    assert items["10"].category == "a5" and items["10"].brand == "a7"  # the root attribute is skipped
    assert len(items["10"].tags) == 45 and "a1" not in items["10"].tags
    assert items["12"].category == "a6" and items["12"].brand is None
    assert all(item.price == 0.0 for item in items.values())


def test_the_catalog_accepts_long_tag_lists_up_to_the_limit() -> None:
    CatalogItem(item_id="x", title="x", price=1.0, tags=[f"t{i}" for i in range(MAX_TAGS)])
    with pytest.raises(ValidationError):
        CatalogItem(item_id="x", title="x", price=1.0, tags=[f"t{i}" for i in range(MAX_TAGS + 1)])


def test_purchase_events_keep_each_users_order_and_the_file_is_in_time_order(tmp_path: Path) -> None:
    histories = read_histories(*write_files(tmp_path))
    events = list(purchase_events(histories))
    assert len(events) == histories.interactions == 9
    assert all(e.type is EventType.PURCHASE for e in events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    for user, sequence in zip(histories.users, histories.sequences, strict=True):
        mine = [e for e in events if e.visitor_id == user]
        assert [e.item_id for e in mine] == sequence
        assert all(a.ts < b.ts for a, b in itertools.pairwise(mine))


def test_written_files_read_back_through_the_importers_own_parsers(tmp_path: Path) -> None:
    histories = read_histories(*write_files(tmp_path))
    items, events = write_jsonl(histories, tmp_path / "events.jsonl", tmp_path / "catalog.jsonl")
    parsed_items = [value for _, value in read_jsonl(tmp_path / "catalog.jsonl", ITEM_ADAPTER)]
    parsed_events = [value for _, value in read_jsonl(tmp_path / "events.jsonl", EVENT_ADAPTER)]
    assert (items, events) == (4, 9)
    assert all(isinstance(i, CatalogItem) for i in parsed_items)
    assert [e.item_id for e in parsed_events] == [e.item_id for e in purchase_events(histories)]


def test_a_user_listed_twice_is_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("1 10 11\n2 11\n1 12\n")
    with pytest.raises(SequenceFileError, match="line 3: user 1 appears twice"):
        read_histories(path)


def test_leaving_out_the_last_interactions() -> None:
    from services.profile.sequences import Histories

    histories = Histories(["a", "b"], [["1", "2", "3"], ["4", "5"]], {})
    assert histories.truncated(1).sequences == [["1", "2"], ["4"]]
    assert histories.truncated(2).sequences == [["1"], []]
