"""CSV import (what shop platforms export): the same records and the same line-numbered errors as JSON Lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from services.common.catalog import CatalogItem
from services.common.events import Event
from services.common.tabular import CsvProblem, csv_records
from services.profile.importer import EVENT_ADAPTER, InvalidInput, InvalidLine, import_catalog, read_records

CATALOG_CSV = (
    "\ufeffitem_id,kind,title,category,price,original_price,stock,active,tags,targeting.cities,targeting.hours,"
    "pinned\n"
    'sku-1,product,"Sepatu lari ""Kilat""",sepatu,349000,499000,12,true,lari|pria| ,jakarta|bandung,18|19,\n'
    'sku-2,,"Kaos katun,\nlengan panjang",fashion-pria,99000,,,TRUE,,,,yes\n'
    "\n"
    "cta-1,cta,Daftar sekarang,,,,,false,,,,\n"
)


def write(path: Path, text: str) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["catalog.csv", "catalog.csv.gz"])
def test_catalog_csv_gives_the_items_the_json_api_would(tmp_path: Path, name: str) -> None:
    items: list[CatalogItem] = []
    report = import_catalog(write(tmp_path / name, CATALOG_CSV), items.extend)
    assert report.accepted == 3 and report.invalid_count == 0
    by_id = {item.item_id: item for item in items}
    assert by_id["sku-1"] == CatalogItem.model_validate(
        {
            "item_id": "sku-1",
            "title": 'Sepatu lari "Kilat"',
            "category": "sepatu",
            "price": 349000,
            "original_price": 499000,
            "stock": 12,
            "tags": ["lari", "pria"],
            "targeting": {"cities": ["jakarta", "bandung"], "hours": [18, 19]},
        }
    )
    assert by_id["sku-2"].title == "Kaos katun,\nlengan panjang" and by_id["sku-2"].pinned is True
    assert by_id["sku-2"].stock is None  # an empty cell is "not given", not 0
    assert by_id["cta-1"].kind.value == "cta" and by_id["cta-1"].active is False


def test_invalid_rows_are_reported_by_the_files_own_line_number(tmp_path: Path) -> None:
    text = (
        "item_id,title,price,colour\n"
        "a,Kaos,99000,\n"
        '"b","Judul\ndua baris",murah,\n'  # the record ends on line 4: price is not a number
        "c,Topi,15000,merah\n"  # line 5: no such field
    )
    path = write(tmp_path / "catalog.csv", text)
    seen: list[str] = []
    with pytest.raises(InvalidInput) as stopped:
        import_catalog(path, lambda batch: seen.extend(i.item_id for i in batch))
    assert stopped.value.invalid.line == 4 and "price" in str(stopped.value) and seen == ["a"]
    report = import_catalog(path, lambda batch: None, skip_invalid=True)
    assert [(i.line, i.errors[0]["field"]) for i in report.invalid] == [(4, "price"), (5, "colour")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "must name the columns"),
        ("item_id,title,item_id\na,b,c\n", 1, "named twice"),
        ("item_id,title,price\na,Kaos,1,extra\n", 2, "4 cells but the header names 3"),
        ("context,context.device\nx,y\n", 2, "clashes"),
    ],
)
def test_files_that_are_not_usable_csv_stop_with_a_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(InvalidInput) as stopped:
        import_catalog(write(tmp_path / "bad.csv", text), lambda batch: None, skip_invalid=True)
    assert stopped.value.invalid.line == line and message in str(stopped.value)


def test_bytes_that_are_not_utf8_stop_with_the_line_reached(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"item_id,title,price\na,Kaos,1\nb,Caf\xe9,2\n")
    with open(path, "rb") as handle, pytest.raises(CsvProblem, match="not UTF-8"):
        list(csv_records(handle))


def test_event_csv_rows_validate_like_json_events(tmp_path: Path) -> None:
    text = (
        "event_id,visitor_id,type,timestamp,item_id,price,context.device,context.city,properties.coupon\n"
        "e1,v1,product_view,2026-11-01T10:00:00+07:00,sku-1,,mobile,Jakarta,\n"
        "e2,v1,purchase,2026-11-01T10:05:00+07:00,sku-1,349000,mobile,Jakarta,GAJIAN\n"
        "e3,v1,product_view,2026-11-01T10:06:00+07:00,,,,,\n"  # a product view needs an item
    )
    rows = list(read_records(write(tmp_path / "events.csv", text), EVENT_ADAPTER))
    first, second, third = (parsed for _, parsed in rows)
    assert isinstance(first, Event) and first == Event.model_validate(
        orjson.loads(
            b'{"event_id": "e1", "visitor_id": "v1", "type": "product_view", "timestamp": "2026-11-01T10:00:00+07:00",'
            b' "item_id": "sku-1", "context": {"device": "mobile", "city": "Jakarta"}}'
        )
    )
    assert isinstance(second, Event) and second.price == 349000 and second.properties == {"coupon": "GAJIAN"}
    assert isinstance(third, InvalidLine) and third.line == 4 and "item_id is required" in third.errors[0]["message"]
