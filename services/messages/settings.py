"""Next-best-message settings: the policy's knobs (env prefix RECOMMEND_MESSAGES_) and the channels."""

from __future__ import annotations

import math
from typing import Final, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.messages.reward import Reward, RewardKind

Channel = Literal["push", "email", "whatsapp"]
CHANNELS: Final = ("push", "email", "whatsapp")
# The consent purpose a message on each channel needs.
PURPOSE: Final = {channel: f"marketing_{channel}" for channel in CHANNELS}


class MessageSettings(BaseSettings):
    """Message policy settings (env prefix RECOMMEND_MESSAGES_)."""

    model_config = SettingsConfigDict(env_prefix="RECOMMEND_MESSAGES_", extra="ignore")

    # Quiet hours in the visitor's local time: [start, end) wraps around midnight when start > end.
    quiet_start_hour: int = Field(default=21, ge=0, le=23)
    quiet_end_hour: int = Field(default=8, ge=0, le=23)
    respect_quiet_hours: bool = True
    default_send_hour: int = Field(default=19, ge=0, le=23)  # when the visitor's active hours are unknown
    # Frequency caps: per channel and across channels, per local calendar day and per rolling 7 days.
    cap_channel_day: int = Field(default=1, ge=0)
    cap_channel_week: int = Field(default=3, ge=0)
    cap_total_day: int = Field(default=2, ge=0)
    cap_total_week: int = Field(default=5, ge=0)
    # Trigger rules.
    cart_min_age_h: float = Field(default=1.0, ge=0)
    cart_max_age_days: float = Field(default=14.0, gt=0)
    min_discount: float = Field(default=0.1, ge=0, le=1)
    restock_days: float = Field(default=7.0, gt=0)
    new_arrival_days: float = Field(default=14.0, gt=0)
    win_back_after_days: float = Field(default=30.0, gt=0)
    loyal_min_orders: int = Field(default=3, ge=1)
    voucher_discount: float = Field(default=0.1, ge=0, le=1)  # {discount} of messages without a product
    # Policy: random control group (sent nothing), exploration, and the uplift a send must beat.
    control_rate: float = Field(default=0.05, ge=0, le=1)
    exploration: float = Field(default=0.1, ge=0, le=1)
    cold_start_exploration: float = Field(default=1.0, ge=0, le=1)  # without a model: uniform over actions
    min_uplift: float = Field(default=0.001, ge=0)  # P(purchase) points a send must add to be worth its fatigue
    max_batch: int = Field(default=1000, ge=1, le=10_000)
    # How often each replica reads the model registry (one small read): a new or pinned model serves within it.
    model_check_interval_s: float = Field(default=10.0, gt=0)
    salt: str = "nbm"
    # What `selaras train-messages` learns and `evaluate messages` scores (services/messages/reward.py); the CLI
    # options of the same names override these. "uplift" learns the reward directly, without opens or clicks.
    learner: Literal["funnel", "uplift"] = "funnel"
    reward: RewardKind = "conversion"
    reward_revenue_cap: float | None = Field(default=None, gt=0)
    reward_conversion_weight: float = 1.0  # the weights of reward "mix"
    reward_visit_weight: float = 0.0
    reward_revenue_weight: float = 0.0

    def reward_spec(self) -> Reward:
        return Reward(
            self.reward,
            math.inf if self.reward_revenue_cap is None else self.reward_revenue_cap,
            self.reward_conversion_weight,
            self.reward_visit_weight,
            self.reward_revenue_weight,
        )
