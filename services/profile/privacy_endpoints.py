"""Privacy routes of the profile service (erasure, export, personas)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
