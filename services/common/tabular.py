"""CSV in the API's schemas: the format shop platforms export (Shopify, WooCommerce, spreadsheets).

One row per record, a header naming the fields. Nested fields use dotted names (`context.device`,
`properties.coupon`, `targeting.cities`); list fields hold values separated by `|` (`tags` = `lari|pria`); a
cell that starts with `{` or `[` is read as JSON (a message template, say); an empty cell means "not given".
Types are the schema's: the same validation as the JSON API runs on every row, so a CSV row and a JSON line
with the same content are the same record. Line numbers are the file's own (a quoted cell may span lines).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from typing import IO, Any, cast

import orjson

LIST_SEPARATOR = "|"


class CsvProblem(ValueError):
    """The file cannot be read as CSV from this line on (bad encoding, a broken quote)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def _cell(column: str, text: str, list_fields: frozenset[str]) -> Any:
    if column in list_fields:
        return [part.strip() for part in text.split(LIST_SEPARATOR) if part.strip()]
    if text[:1] in "{[":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text  # validation names the field if text is not allowed there
    return text


def _nested(row: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for column, value in row.items():
        *parents, leaf = column.split(".")
        target = record
        for parent in parents:
            child = target.setdefault(parent, {})
            if not isinstance(child, dict):  # "context" and "context.device" both given
                raise CsvProblem(0, f"column {column!r} clashes with column {parent!r}")
            target = child
        target[leaf] = value
    return record


def csv_records(
    handle: IO[bytes] | gzip.GzipFile, list_fields: frozenset[str] = frozenset()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) per data row; blank rows are skipped. Raises CsvProblem when the header is missing
    or the file cannot be decoded further (everything yielded before stays valid)."""
    text = io.TextIOWrapper(cast(IO[bytes], handle), encoding="utf-8-sig", newline="")  # -sig: spreadsheets write a BOM
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise CsvProblem(1, "the first line must name the columns (e.g. item_id,title,price)")
        columns = [name.strip() for name in header]
        duplicates = {name for name in columns if columns.count(name) > 1 and name}
        if duplicates:
            raise CsvProblem(1, f"columns named twice: {', '.join(sorted(duplicates))}")
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(columns):
                raise CsvProblem(reader.line_num, f"{len(cells)} cells but the header names {len(columns)} columns")
            row = {
                column: _cell(column, cell.strip(), list_fields)
                for column, cell in zip(columns, cells, strict=False)
                if column and cell.strip()
            }
            try:
                yield reader.line_num, _nested(row)
            except CsvProblem as exc:
                raise CsvProblem(reader.line_num, exc.message) from exc
    except UnicodeDecodeError as exc:
        raise CsvProblem(reader.line_num + 1, f"not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise CsvProblem(reader.line_num, f"not valid CSV: {exc}") from exc


def is_csv(name: str) -> bool:
    return name.endswith((".csv", ".csv.gz"))
