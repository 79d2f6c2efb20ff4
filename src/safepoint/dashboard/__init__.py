"""``safepoint serve``: a web dashboard for runs and Hugging Face output directories.

Why a dashboard when ``safepoint ls`` exists: a run that crashed and resumed is a story told
across several logs (metrics per attempt, saves, restores, prunes, the supervisor's restarts);
one page with the curve stitched across restarts, the marks on it and the disk against its budget
answers "what happened overnight" at a glance, and ``/metrics`` lets Prometheus alert on it.

Layout: ``runs`` (which runs, safe path resolution, the ``ls`` data), ``history`` (logs ->
stitched curves, marks, attempts), ``charts`` (SVG), ``pages`` (HTML), ``actions`` (pin, delete,
verify, export), ``prom`` (/metrics), ``server`` (FastAPI; needs the ``dashboard`` extra). Only
``server`` imports FastAPI, so the rest is usable and testable without it.
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """``server.create_app``, imported on use (FastAPI is an optional dependency)."""
    from .server import create_app as create

    return create(*args, **kwargs)
