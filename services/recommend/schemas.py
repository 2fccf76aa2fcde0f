"""Request and response bodies of the recommend service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.common.catalog import CatalogItem, ItemKind
from services.common.events import Device, Identifier

SlotName = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.:-]+$")]
# personal: the visitor's own candidates; similar / bought_together: neighbours of `context.item_ids`;
# rerank: the shop's own list (`candidate_ids`) in the visitor's order.
SlotStrategy = Literal["personal", "similar", "bought_together", "rerank"]
ANCHORED: frozenset[str] = frozenset({"similar", "bought_together"})
MAX_ANCHORS = 20
MAX_CANDIDATE_IDS = 1000


class RequestContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Device | None = None
    channel: Annotated[str, StringConstraints(max_length=32)] | None = None
    city: Annotated[str, StringConstraints(max_length=64)] | None = None
    locale: Annotated[str, StringConstraints(max_length=16)] | None = None
    utc_offset_min: Annotated[int, Field(ge=-720, le=840)] | None = None
    page: Annotated[str, StringConstraints(max_length=64)] | None = None
    # The items the page is about (a product page's item, the cart's items): the anchors of "similar" and
    # "bought_together" slots, never recommended back. Unknown ids are a 422 naming `context.item_ids.<i>`.
    item_ids: list[Identifier] = Field(default_factory=list, max_length=MAX_ANCHORS)
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
    strategy: SlotStrategy = Field(
        default="personal",
        description=(
            "personal (default); similar or bought_together: neighbours of context.item_ids, re-ranked for a "
            "known visitor; rerank: candidate_ids in the visitor's order. Non-personal strategies rank products "
            "only; similar and rerank apply a per-category quota only when max_per_category is set."
        ),
    )
    candidate_ids: list[Identifier] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CANDIDATE_IDS,
        validate_default=True,
        description=(
            "rerank only: the shop's own list (search or category results), 1 to 1000 item ids. Ids the catalog "
            "does not know are ignored and counted in the slot's `unknown_candidates`; the answer holds the best "
            "`count` of the known, available ones."
        ),
    )

    @model_validator(mode="after")
    def _no_messages(self) -> SlotRequest:
        if self.kind is ItemKind.MESSAGE:
            raise ValueError("messages are chosen by POST /v1/next-best-message, not by a slot")
        return self

    @field_validator("strategy")
    @classmethod
    def _products_only(cls, strategy: str, info: ValidationInfo) -> str:
        if strategy != "personal" and info.data.get("kind", ItemKind.PRODUCT) is not ItemKind.PRODUCT:
            raise ValueError(f"strategy {strategy!r} ranks products only")
        return strategy

    @field_validator("candidate_ids")
    @classmethod
    def _candidates_for_rerank(cls, ids: list[str] | None, info: ValidationInfo) -> list[str] | None:
        strategy = info.data.get("strategy")
        if strategy == "rerank" and ids is None:
            raise ValueError("a rerank slot needs candidate_ids (1 to 1000 item ids)")
        if strategy is not None and strategy != "rerank" and ids is not None:
            raise ValueError("candidate_ids are only read by a rerank slot")
        return ids


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


class ItemCard(BaseModel):
    """What a widget shows of one item."""

    item_id: str
    position: int
    score: float
    title: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    url: str | None = None
    image_url: str | None = None


class RecommendedItem(ItemCard):
    propensity: float = 1.0
    reasons: list[str] | None = None


class SlotResult(BaseModel):
    name: str
    kind: ItemKind
    items: list[RecommendedItem]
    strategy: SlotStrategy | None = None  # set for slots that are not "personal"
    unknown_candidates: int | None = None  # rerank: how many candidate_ids the catalog does not know


class SimilarItems(BaseModel):
    """GET /v1/items/{item_id}/similar: the item's neighbours, the same for every visitor."""

    item_id: str
    strategy: Literal["similar", "bought_together"]
    items: list[ItemCard]


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
