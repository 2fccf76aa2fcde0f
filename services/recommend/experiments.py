"""Experiments: configuration, sticky assignment, exposure recording and reports."""

from __future__ import annotations

from services.recommend.repository import RecommendRepository
from services.recommend.service import ArmChooser
from services.recommend.settings import RecommendSettings


def load_experiments(settings: RecommendSettings, repository: RecommendRepository) -> ArmChooser | None:
    """The experiment runtime for the service, or None when no experiment is configured."""
    return None
