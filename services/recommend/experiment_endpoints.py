"""Experiment routes of the recommend service (admin API, report, dashboard page)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
