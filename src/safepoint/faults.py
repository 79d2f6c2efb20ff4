"""Named fault points, so tests can break a save at every stage.

Set ``SAFEPOINT_FAULT=<point>`` (optionally ``<point>:kill``) in the environment and the save stops
at that point: by raising ``InjectedFault`` (the default) or by SIGKILLing its own process, which is
what a power cut or the OOM killer looks like. The points, in the order a save reaches them:

    after_data       every tensor file written and fsynced
    before_manifest  state.json written; manifest not yet
    before_rename    manifest written and fsynced; the tmp directory not yet renamed
    after_rename     committed; retention not yet applied
    during_delete    a checkpoint is being deleted by retention (after its move to .trash)

Reading one environment variable per stage costs nothing next to the I/O of a save.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_data", "before_manifest", "before_rename", "after_rename", "during_delete")
ENV = "SAFEPOINT_FAULT"


class InjectedFault(RuntimeError):
    """Raised at a fault point chosen by a test."""


def reach(point: str) -> None:
    """Called by the save path at each named stage; does nothing unless a test asked for it."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, action = wanted.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"fault injected at {point!r}")
