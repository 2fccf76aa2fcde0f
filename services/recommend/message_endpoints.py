"""Next-best-message routes of the recommend service."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
