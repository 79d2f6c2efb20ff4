"""``python -m safepoint``: the same command as the ``safepoint`` script."""

from .cli import app

app(prog_name="safepoint")
