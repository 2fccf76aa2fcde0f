"""Request and response bodies of the recommend service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.common.catalog import CatalogItem, ItemKind
from services.common.events import Device, Identifier

SlotName = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.:-]+$")]


class RequestContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Device | None = None
    channel: Annotated[str, StringConstraints(max_length=32)] | None = None
    city: Annotated[str, StringConstraints(max_length=64)] | None = None
    locale: Annotated[str, StringConstraints(max_length=16)] | None = None
    utc_offset_min: Annotated[int, Field(ge=-720, le=840)] | None = None
    page: Annotated[str, StringConstraints(max_length=64)] | None = None
    # The request time; defaults to the service clock. Honoured only for admin keys or in a simulation
    # deployment (SELARAS_SIMULATION): the answer's `time` says which time was used.
    now: AwareDatetime | None = None


class SlotFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    categories: list[Annotated[str, StringConstraints(max_length=64)]] = Field(default_factory=list, max_length=50)
    brands: list[Annotated[str, StringConstraints(max_length=64)]] = Field(default_factory=list, max_length=50)
    min_price: Annotated[float, Field(ge=0)] | None = None
    max_price: Annotated[float, Field(ge=0)] | None = None
    exclude_items: list[Identifier] = Field(default_factory=list, max_length=500)


class SlotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: SlotName
    kind: ItemKind = ItemKind.PRODUCT
    count: Annotated[int, Field(ge=1, le=100)] = 10
    filters: SlotFilters = Field(default_factory=SlotFilters)
    max_per_category: Annotated[int, Field(ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _no_messages(self) -> SlotRequest:
        if self.kind is ItemKind.MESSAGE:
            raise ValueError("messages are chosen by POST /v1/next-best-message, not by a slot")
        return self


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    visitor_id: Identifier
    context: RequestContext = Field(default_factory=RequestContext)
    slots: list[SlotRequest] = Field(min_length=1, max_length=10)
    explain: bool = False

    @model_validator(mode="after")
    def _unique_slot_names(self) -> RecommendRequest:
        names = [slot.name for slot in self.slots]
        if len(set(names)) != len(names):
            raise ValueError("slot names must be unique within a request")
        return self


class RecommendedItem(BaseModel):
    item_id: str
    position: int
    score: float
    title: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    url: str | None = None
    image_url: str | None = None
    propensity: float = 1.0
    reasons: list[str] | None = None


class SlotResult(BaseModel):
    name: str
    kind: ItemKind
    items: list[RecommendedItem]


class ExperimentTag(BaseModel):
    key: str
    arm: str


class TimeUsed(BaseModel):
    """The business time a request was answered at: the service clock, or the request's own `now`."""

    now: str
    source: Literal["clock", "request"]
    ignored: str | None = None  # set when the request asked for a time it may not choose


class RecommendResponse(BaseModel):
    recommendation_id: str
    visitor_id: str
    model_version: str | None
    fallback: bool
    strategy: str
    experiment: ExperimentTag | None
    took_ms: float
    time: TimeUsed
    slots: list[SlotResult]


class CatalogUpsert(BaseModel):
    """Documented body of PUT /v1/catalog/items (validated item by item for errors by index)."""

    items: list[CatalogItem] = Field(min_length=1, max_length=5000)


class CatalogUpsertResult(BaseModel):
    upserted: int


class ReloadResult(BaseModel):
    model_version: str | None
    previous_version: str | None
    detail: dict[str, Any] = Field(default_factory=dict)
