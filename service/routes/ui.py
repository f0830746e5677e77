"""The web console under /ui: static pages that are clients of the JSON API (/v1).

The pages carry no data and need no token to load; their script (static/console.js) keeps the
tenant's token in sessionStorage and sends it as the Authorization header of every fetch. No cookie
carries a credential (so there is nothing to forge a cross-site request with) and the token is never
in a URL. Every response here has a strict Content-Security-Policy: scripts only from /ui/static,
no inline script, no eval, nothing framed from or framing us.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from service.db import STATUSES
from service.specs import KINDS

UI = Path(__file__).resolve().parent.parent / "ui"
templates = Jinja2Templates(directory=UI / "templates")
STATIC = {p.name: p for p in (UI / "static").iterdir() if p.suffix in (".js", ".css")}
MEDIA = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'")
# The job page shows the run report in a sandboxed frame (no scripts, opaque origin). A frame's
# srcdoc inherits this page's policy, and the report is styled inline (its charts are SVG with
# style attributes), so this one page allows inline styles; scripts stay 'self' only.
JOB_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-store", "Cross-Origin-Opener-Policy": "same-origin"}

router = APIRouter(prefix="/ui", include_in_schema=False)

JobId = Annotated[str, PathParam(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def page(request: Request, name: str, csp: str = CSP, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, f"{name}.html", {"page": name, "kinds": KINDS,
                                                                    "statuses": STATUSES, **context})
    response.headers.update({**HEADERS, "Content-Security-Policy": csp})
    return response


@router.get("", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    return page(request, "jobs")


@router.get("/signin", response_class=HTMLResponse)
def signin(request: Request) -> HTMLResponse:
    return page(request, "signin")


@router.get("/submit", response_class=HTMLResponse)
def submit(request: Request) -> HTMLResponse:
    return page(request, "submit")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: JobId) -> HTMLResponse:
    # Whether the job exists (and is the tenant's) is the API's answer to the page's script.
    return page(request, "job", JOB_CSP, job_id=job_id)


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC:
        raise HTTPException(404, "not found")
    return FileResponse(STATIC[name], media_type=MEDIA[STATIC[name].suffix],
                        headers={**HEADERS, "Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
