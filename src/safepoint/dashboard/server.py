"""The dashboard's HTTP surface (FastAPI), and ``serve`` for ``safepoint serve``.

Security model, because this server can delete checkpoints:

* It binds to 127.0.0.1 by default. Any other address needs a token (``serve`` refuses to start
  without one), and with a token every action (POST) must carry it (``X-Safepoint-Token`` or
  ``Authorization: Bearer``), compared in constant time. Pages, the JSON state and ``/metrics``
  are read-only and stay open, so Prometheus can scrape without a secret.
* Actions must be ``application/json`` POSTs whose ``Origin`` (when sent) is this server: a
  foreign web page can neither submit a form to it nor pass the CORS preflight a JSON POST needs.
  On loopback, requests whose ``Host`` is not a loopback name are refused (DNS rebinding).
* A run is named by a path relative to the served directory; ``runs.resolve`` rejects anything
  that escapes it (``..``, absolute paths, symlinks out) with the same 404 as a missing run.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import CheckpointNotFound, DirectoryLocked, RunDirectoryError, SafepointError
from . import actions, pages, prom
from .runs import NotFound, find_runs, open_served, run_overview, run_state

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
ACTIONS = ("pin", "unpin", "delete", "verify", "export")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the dashboard beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"serving on {host} exposes the dashboard's actions (pin, delete, ...) to the network; "
                         "give --token T (or SAFEPOINT_TOKEN), or bind to 127.0.0.1 and use an SSH tunnel")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _host_name(header: str) -> str:
    return (urlsplit("//" + header).hostname or "") if header else ""


def create_app(root: str | os.PathLike[str], *, host: str = "127.0.0.1", token: str | None = None) -> FastAPI:
    """The dashboard for ``root`` (a run, or a directory of runs), as it would be bound to ``host``."""
    root = Path(root)
    if not root.is_dir():
        raise RunDirectoryError(f"{root} is not a directory")
    token = token or None
    loopback = is_loopback(host)
    verified: dict[Path, dict[int, tuple[bool, str]]] = {}
    app = FastAPI(title="safepoint dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if loopback and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return PlainTextResponse("this dashboard answers only to localhost names", status_code=403)
        return await call_next(request)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return _error(404, "no run at this path")

    def state_of(rel: str) -> tuple[dict[str, Any], str]:
        view, name = open_served(root, rel)
        return run_state(name, view, verified.get(view.path)), name

    @app.get("/", response_class=HTMLResponse)
    def index() -> Response:
        runs = find_runs(root)
        if len(runs) == 1 and runs[0][0] == "":
            return RedirectResponse("/run/", status_code=307)
        return HTMLResponse(pages.index_page(str(root), [run_overview(n, v) for n, v in runs], token is not None))

    @app.get("/api/runs")
    def api_runs() -> dict[str, Any]:
        return {"root": str(root), "runs": [run_overview(n, v) for n, v in find_runs(root)]}

    @app.get("/run/{rel:path}", response_class=HTMLResponse)
    def run_page(rel: str) -> Response:
        state, name = state_of(rel)
        return HTMLResponse(pages.run_page(state, api="/api/run/" + quote(name), act=f"/api/action/ACTION/{quote(name)}",
                                           can_export=True, token_required=token is not None))

    @app.get("/api/run/{rel:path}")
    def api_run(rel: str) -> dict[str, Any]:
        state, _ = state_of(rel)
        return dict(state, html=pages.run_fragments(state, can_export=True))

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return PlainTextResponse(prom.render(find_runs(root)), media_type="text/plain; version=0.0.4")

    @app.post("/api/action/{action}/{rel:path}")
    async def act(action: str, rel: str, request: Request) -> Response:
        if action not in ACTIONS:
            return _error(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "actions are JSON POSTs (Content-Type: application/json)")
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, "cross-origin action refused")
        if token is not None:
            given = request.headers.get("x-safepoint-token") or \
                request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "this dashboard needs its token for actions (X-Safepoint-Token)")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, 'the body must be a JSON object, e.g. {"step": 40}')
        view, _ = open_served(root, rel)
        try:
            return JSONResponse(await run_in_threadpool(_do, action, view, body, verified))
        except (CheckpointNotFound, NotFound) as err:
            return _error(404, str(err))
        except (actions.Refused, DirectoryLocked) as err:
            return _error(409, str(err))
        except (SafepointError, ValueError, TypeError, OSError) as err:
            return _error(400, str(err))

    return app


def _do(action: str, view: Any, body: dict[str, Any], verified: dict[Path, dict[int, tuple[bool, str]]]) -> dict[str, Any]:
    step = body.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise ValueError(f"step must be an integer, got {step!r}")
    if step is None and action != "verify":
        raise ValueError(f"{action} needs a step")
    if action in ("pin", "unpin"):
        return {"message": actions.pin(view, step, action == "pin")}
    if action == "delete":
        return {"message": actions.delete(view, step, body.get("confirm"))}
    if action == "verify":
        message, rows = actions.verify(view, step)
        done = verified.setdefault(view.path, {})
        done.update({r["step"]: (r["ok"], r["detail"]) for r in rows})
        return {"message": message, "results": rows, "ok": all(r["ok"] for r in rows)}
    message, out = actions.export(view, step, body.get("dtype"))
    return {"message": message, "path": str(out)}


def serve(directory: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8080,
          token: str | None = None) -> None:
    """Run the dashboard until interrupted (what ``safepoint serve`` does)."""
    import uvicorn

    check_bind(host, token)
    app = create_app(directory, host=host, token=token)
    shown = f"[{host}]" if ":" in host else host
    print(f"safepoint dashboard for {directory} on http://{shown}:{port}/"
          + (" (actions need the token)" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
