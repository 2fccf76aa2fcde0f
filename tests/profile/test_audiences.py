"""Audience export: the right visitors, consent per channel respected, line-oriented CSV, clear errors."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.consent import Consent, ConsentDefaults
from services.features.aggregations import SegmentRules, VisitorState
from services.profile.audiences import AudienceCount, AudienceFilter, InvalidAudience, audience_rows
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings

DAY = 86_400.0
NOW = 1_800_000_000.0


def state(visitor_id: str, days_away: float, orders: int = 0, persona: int = -1) -> VisitorState:
    seen = NOW - days_away * DAY
    return VisitorState(
        visitor_id=visitor_id,
        event_count=5,
        first_seen=seen - 90 * DAY,
        last_seen=seen,
        orders=orders,
        monetary=250_000.0 * orders,
        persona_id=persona,
    )


STATES = [
    state("dormant-buyer", 120, orders=2, persona=1),
    state("at-risk-buyer", 40, orders=1, persona=2),
    state("at-risk-browser", 45, persona=2),
    state("active-buyer", 1, orders=3, persona=1),
]


def rows(audience: AudienceFilter, consents: dict[str, Consent] | None = None) -> tuple[list[str], AudienceCount]:
    count = AudienceCount()
    found = audience_rows(
        [STATES[:2], STATES[2:]],
        lambda ids: {i: c for i, c in (consents or {}).items() if i in ids},
        SegmentRules(),
        ConsentDefaults(),  # marketing is opt-in by default
        NOW,
        audience,
        count,
    )
    return [row["visitor_id"] for row in found], count


def test_segment_and_persona_conditions_select_the_audience() -> None:
    at_risk, count = rows(AudienceFilter.parse(["lifecycle=at_risk"], [], None))
    assert at_risk == ["at-risk-buyer", "at-risk-browser"] and (count.visitors, count.matched) == (4, 2)
    either, _ = rows(AudienceFilter.parse(["lifecycle=at_risk", "lifecycle=dormant", "is_customer=1"], [], None))
    assert either == ["dormant-buyer", "at-risk-buyer"]
    persona_one, _ = rows(AudienceFilter.parse([], [1], None))
    assert persona_one == ["dormant-buyer", "active-buyer"]


def test_a_channel_keeps_only_visitors_who_allow_marketing_on_it() -> None:
    consents = {
        "at-risk-buyer": Consent({"marketing_email": True}, 1.0),
        "at-risk-browser": Consent({"marketing_email": False, "marketing_push": True}, 1.0),
    }
    email, count = rows(AudienceFilter.parse(["lifecycle=at_risk"], [], "email"), consents)
    assert email == ["at-risk-buyer"] and count.without_consent == 1
    push, _ = rows(AudienceFilter.parse(["lifecycle=at_risk"], [], "push"), consents)
    assert push == ["at-risk-browser"]  # opt-in by default: no choice means no broadcast


@pytest.mark.parametrize(
    ("conditions", "channel", "message"),
    [
        (["lifecycle"], None, "column=value"),
        (["favourite_colour=red"], None, "not a segment column"),
        ([], "fax", "not one of"),
    ],
)
def test_bad_filters_are_refused_clearly(conditions: list[str], channel: str | None, message: str) -> None:
    with pytest.raises(InvalidAudience, match=message):
        AudienceFilter.parse(conditions, [], channel)


def test_cli_writes_the_audience_as_csv(settings_factory: Callable[..., Any], tmp_path: Path) -> None:
    settings: ProfileSettings = settings_factory(ProfileSettings, clock_start="2027-01-15T00:00:00+00:00")
    repository = ProfileRepository.open(settings)
    try:
        repository.save_visitor_states({s.visitor_id: s for s in STATES}, ttl_s=None)
        repository.save_consents({"at-risk-buyer": Consent({"marketing_whatsapp": True}, 1.0)})
    finally:
        repository.close()
    out = tmp_path / "audience.csv"
    env = {
        "REDIS_URL": settings.redis_url or "",
        "SELARAS_NAMESPACE": settings.namespace,
        "SELARAS_FEAST_PROJECT": settings.feast_project,
        "SELARAS_CLOCK_START": "2027-01-15T00:00:00+00:00",  # NOW is 2027-01-15 08:00 UTC
        "SELARAS_ENVIRONMENT": "test",
    }
    args = ["export", "audience", "--data-dir", str(settings.data_dir), "--where", "lifecycle=at_risk"]
    result = CliRunner().invoke(cli, [*args, "--channel", "whatsapp", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["visitor_id"] for r in table] == ["at-risk-buyer"]
    assert table[0]["persona_id"] == "2" and table[0]["lifecycle"] == "at_risk" and table[0]["orders"] == "1"
    refused = CliRunner().invoke(cli, [*args, "--channel", "fax"], env=env)
    assert refused.exit_code == 2 and "invalid audience" in refused.output
