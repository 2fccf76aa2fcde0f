"""Report routes, mounted by the recommend service next to /experiments.

`GET /v1/reports` and `GET /v1/reports/{name}` need an `admin` key (evaluations and personas describe the shop's
business, though no visitor). The pages `/reports/` (the list) and `/reports/{name}` are one static shell, like
/experiments: it calls those routes with the key the user types (kept in the tab's sessionStorage, shared with
/experiments) or passes in the URL fragment (`#key=...`, never sent to the server), and shows the stored fragment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from services.common.api import StaticPages, require_scope
from services.common.auth import ApiKeyAuth
from services.common.errors import NotFound
from services.reports.pages import NAME, Kind
from services.reports.store import ReportStore

PAGES: Final = StaticPages(Path(__file__).resolve().parent / "static", ("reports.js", "reports.css"))


@dataclass(frozen=True)
class ReportsState:
    store: ReportStore
    auth: ApiKeyAuth


def get_state(request: Request) -> ReportsState:
    state: ReportsState = request.app.state.reports
    return state


def get_auth(request: Request) -> ApiKeyAuth:
    return get_state(request).auth


State = Annotated[ReportsState, Depends(get_state)]
AdminKey = Annotated[str, Depends(require_scope(get_auth, "admin"))]
router = APIRouter()


class ReportInfo(BaseModel):
    name: str
    kind: Kind
    title: str
    created_at: str
    summary: str


class ReportList(BaseModel):
    reports: list[ReportInfo]


class ReportPage(ReportInfo):
    html: str  # the report's HTML fragment (tables and inline SVG plots), rendered by the command


@router.get("/v1/reports", response_model=ReportList)
async def list_reports(state: State, _: AdminKey) -> ReportList:
    """The stored reports (`selaras personas`, `selaras evaluate ranking`), newest first."""
    reports = await run_in_threadpool(state.store.all)
    return ReportList(reports=[ReportInfo(**{k: v for k, v in r.to_dict().items() if k != "html"}) for r in reports])


@router.get("/v1/reports/{name}", response_model=ReportPage, responses={404: {"description": "Unknown report"}})
async def get_report(name: str, state: State, _: AdminKey) -> ReportPage:
    """One report with its HTML fragment (tables and inline SVG plots)."""
    report = await run_in_threadpool(state.store.get, name) if NAME.match(name) else None
    if report is None:
        raise NotFound(f"no report {name!r}: `selaras personas` and `selaras evaluate ranking` write them")
    return ReportPage(**report.to_dict())


@router.get("/reports", include_in_schema=False)
def reports_root() -> Response:
    return RedirectResponse("/reports/", status_code=308)


@router.get("/reports/", include_in_schema=False)
def reports_page() -> Response:
    return PAGES.response("reports.html")


@router.get("/reports/assets/{name}", include_in_schema=False)
def reports_asset(name: str) -> Response:
    return PAGES.asset(name)


@router.get("/reports/{name}", include_in_schema=False)
def report_page(name: str) -> Response:
    return PAGES.response("reports.html")
