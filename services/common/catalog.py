"""The catalog contract: products, banners, calls-to-action and message templates (one upsert schema)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.common.events import Identifier

Text = Annotated[str, StringConstraints(max_length=1000)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]


# What a message template answers to (services/messages/service.py decides which one fires).
MESSAGE_TRIGGERS: Final = (
    "cart_abandonment",
    "price_drop",
    "back_in_stock",
    "new_arrivals",
    "win_back",
    "loyalty_reward",
    "payday_promo",
)

# Real catalogs carry long attribute lists (public splits: up to ~60 per item); tags stay a bounded list.
MAX_TAGS = 100


class ItemKind(StrEnum):
    PRODUCT = "product"
    BANNER = "banner"
    CTA = "cta"
    MESSAGE = "message"


class Targeting(BaseModel):
    """Who a banner, CTA or message is meant for. Empty lists mean "everyone"."""

    model_config = ConfigDict(extra="forbid")

    categories: list[Label] = Field(default_factory=list, max_length=50)
    devices: list[Label] = Field(default_factory=list, max_length=10)
    cities: list[Label] = Field(default_factory=list, max_length=100)
    personas: list[Label] = Field(default_factory=list, max_length=10)
    segments: list[Label] = Field(default_factory=list, max_length=20)
    hours: list[Annotated[int, Field(ge=0, le=23)]] = Field(default_factory=list, max_length=24)
    payday_only: bool = False


class MessageTemplate(BaseModel):
    """A message's wording: per locale and tone, with {tokens} filled at render time."""

    model_config = ConfigDict(extra="forbid")

    channels: list[Annotated[str, StringConstraints(pattern=r"^(push|email|whatsapp)$")]] = Field(
        min_length=1, max_length=3
    )
    trigger: Annotated[str, StringConstraints(pattern=rf"^({'|'.join(MESSAGE_TRIGGERS)})$")]
    # texts[locale][tone] = {"title": ..., "body": ...}; locales "id" and "en", tones "short" and "detailed".
    texts: dict[Label, dict[Label, dict[Label, Text]]]
    deep_link: Annotated[str, StringConstraints(max_length=512)] = ""
    cooldown_hours: Annotated[float, Field(ge=0, le=24 * 365)] = 72.0


class CatalogItem(BaseModel):
    """One catalog entry. Prices are in IDR; `original_price` above `price` means a discount."""

    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    kind: ItemKind = ItemKind.PRODUCT
    title: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    category: Label | None = None
    brand: Label | None = None
    price: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] | None = None
    original_price: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] | None = None
    stock: Annotated[int, Field(ge=0)] | None = None
    created_at: AwareDatetime | None = None
    active: bool = True
    tags: list[Label] = Field(default_factory=list, max_length=MAX_TAGS)
    # Merchandiser controls: pinned items go first in their slot, boost multiplies the model score.
    pinned: bool = False
    boost: Annotated[float, Field(ge=0, le=100)] = 1.0
    image_url: Annotated[str, StringConstraints(max_length=512)] | None = None
    url: Annotated[str, StringConstraints(max_length=512)] | None = None
    targeting: Targeting = Field(default_factory=Targeting)
    message: MessageTemplate | None = None

    @model_validator(mode="after")
    def _kind_rules(self) -> CatalogItem:
        if self.kind is ItemKind.PRODUCT and self.price is None:
            raise ValueError("price is required for products")
        if self.kind is ItemKind.MESSAGE and self.message is None:
            raise ValueError("message is required for items of kind message")
        if self.kind is not ItemKind.MESSAGE and self.message is not None:
            raise ValueError("message is only allowed on items of kind message")
        return self

    @property
    def discount(self) -> float:
        """Fraction off the original price, 0 when there is none."""
        if self.price is None or not self.original_price or self.original_price <= self.price:
            return 0.0
        return 1.0 - self.price / self.original_price

    @property
    def in_stock(self) -> bool:
        return self.stock is None or self.stock > 0
