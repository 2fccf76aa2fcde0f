"""The training log in compact columns: what training and offline evaluation read of each logged event, in
time order, at a few dozen bytes per event instead of a validated `Event` object each.

The log is read once, streamed (`RecommendRepository.logged_events`: archive then hot window, one file and one
batch per partition in memory); each event leaves only its fields below in typed arrays, strings coded against
one table per column (a shop has far fewer visitors, items, cities and slots than events). Time order: the log
is in arrival order (per partition, merged by position), not in event time (imports, offline clients and
retries carry older timestamps), so the kept rows are put in time order by a stable sort of the time column,
ties in log order: the order `sorted(events, key=ts)` gave on the whole list.

Readers iterate `LoggedEvent` rows, made a chunk at a time; only the columns stay in memory.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, overload

import numpy as np

from services.common.events import Event, EventType

_TYPES = list(EventType)
_TYPE_CODES = {t: n for n, t in enumerate(_TYPES)}
_NO_OFFSET = -32768  # int16 sentinel: an event whose timestamp carries no UTC offset (never: it is aware)
_CHUNK = 8192  # rows made per step of an iteration
# The text fields of `LoggedEvent`, each kept as codes into a table of its values.
_STRING_COLUMNS = ("visitor_id", "item_id", "device", "channel", "city", "recommendation_id", "slot")


class LoggedEvent(NamedTuple):
    """One logged event as training reads it (the fields of `Event` its queries, replays and embeddings use)."""

    visitor_id: str
    ts: float
    type: EventType
    item_id: str | None
    device: str | None
    channel: str | None
    city: str | None
    utc_offset_min: int | None
    recommendation_id: str | None
    slot: str  # properties["slot"] as text, "" when absent (impressions)

    @classmethod
    def of(cls, event: Event) -> LoggedEvent:
        offset = event.timestamp.utcoffset()
        return cls(
            event.visitor_id,
            event.ts,
            event.type,
            event.item_id,
            event.context.device.value if event.context.device else None,
            event.context.channel,
            event.context.city,
            int(offset.total_seconds() // 60) if offset is not None else None,
            event.recommendation_id,
            str(event.properties.get("slot", "")),
        )


class _Codes:
    """Values of one string column, each stored once; rows keep its code."""

    def __init__(self) -> None:
        self.values: list[str | None] = []
        self.codes: dict[str | None, int] = {}

    def code(self, value: str | None) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
        return code


class EventColumnsBuilder:
    """Collects events in log order (one at a time: the caller streams the log)."""

    def __init__(self) -> None:
        self._ts = array.array("d")
        self._type = array.array("b")
        self._offset = array.array("h")
        self._columns = {name: (array.array("i"), _Codes()) for name in _STRING_COLUMNS}

    def add(self, event: LoggedEvent) -> None:
        self._ts.append(event.ts)
        self._type.append(_TYPE_CODES[event.type])
        self._offset.append(_NO_OFFSET if event.utc_offset_min is None else event.utc_offset_min)
        for name in _STRING_COLUMNS:
            codes, table = self._columns[name]
            codes.append(table.code(getattr(event, name)))

    def visitors(self) -> list[str]:
        """Every visitor id seen, once each."""
        return [v for v in self._columns["visitor_id"][1].values if v is not None]

    def build(self, leave_out: Iterable[str] = ()) -> EventColumns:
        """The events of every visitor but `leave_out`, in time order (ties: log order)."""
        visitor_codes, visitor_table = self._columns["visitor_id"]
        dropped = [visitor_table.codes[v] for v in leave_out if v in visitor_table.codes]
        kept = np.flatnonzero(~np.isin(_array(visitor_codes, np.int32), np.asarray(dropped, dtype=np.int32)))
        ts = _array(self._ts, np.float64)
        # Stable: events of the same time keep their log order, as `sorted(events, key=ts)` kept them.
        order = kept[np.argsort(ts[kept], kind="stable")]
        codes = {
            name: (_array(self._columns[name][0], np.int32)[order], self._columns[name][1].values)
            for name in _STRING_COLUMNS
        }
        return EventColumns(ts[order], _array(self._type, np.int8)[order], _array(self._offset, np.int16)[order], codes)


def _array(values: array.array[Any], dtype: type[np.generic]) -> np.ndarray:
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


class EventColumns(Sequence[LoggedEvent]):
    """Logged events in time order, as columns (see the module docstring). Iterating makes the rows a chunk at
    a time; `ts` is the time column itself."""

    def __init__(
        self,
        ts: np.ndarray,
        types: np.ndarray,
        offsets: np.ndarray,
        codes: dict[str, tuple[np.ndarray, list[str | None]]],
    ):
        self.ts = ts
        self._types = types
        self._offsets = offsets
        self._codes = codes

    @classmethod
    def of(cls, events: Iterable[Event | LoggedEvent]) -> EventColumns:
        """Columns of `events` in time order (tests, small logs)."""
        builder = EventColumnsBuilder()
        for event in events:
            builder.add(event if isinstance(event, LoggedEvent) else LoggedEvent.of(event))
        return builder.build()

    def __len__(self) -> int:
        return len(self.ts)

    @overload
    def __getitem__(self, index: int) -> LoggedEvent: ...

    @overload
    def __getitem__(self, index: slice) -> EventColumns: ...

    def __getitem__(self, index: int | slice) -> LoggedEvent | EventColumns:
        if isinstance(index, slice):
            return EventColumns(
                self.ts[index],
                self._types[index],
                self._offsets[index],
                {name: (codes[index], values) for name, (codes, values) in self._codes.items()},
            )
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return next(self._rows(index % len(self), index % len(self) + 1))

    def __iter__(self) -> Iterator[LoggedEvent]:
        for start in range(0, len(self), _CHUNK):
            yield from self._rows(start, min(start + _CHUNK, len(self)))

    def _rows(self, start: int, end: int) -> Iterator[LoggedEvent]:
        columns = {
            name: [values[c] for c in codes[start:end].tolist()] for name, (codes, values) in self._codes.items()
        }
        visitors, items, devices, channels, cities, recommendations, slots = (columns[n] for n in _STRING_COLUMNS)
        offsets = [None if o == _NO_OFFSET else o for o in self._offsets[start:end].tolist()]
        types = [_TYPES[t] for t in self._types[start:end].tolist()]
        for row in zip(
            visitors,
            self.ts[start:end].tolist(),
            types,
            items,
            devices,
            channels,
            cities,
            offsets,
            recommendations,
            slots,
            strict=True,
        ):
            yield LoggedEvent._make(row)
