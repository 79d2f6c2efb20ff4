"""Server-rendered SVG line charts: no JavaScript charting library, no CDN, nothing to vendor.

The server already has the stitched points; an SVG string is smaller than the code a client-side
chart would need, works with scripts off, and the live update just swaps it in.
"""

from __future__ import annotations

from html import escape
from typing import Any

MARK_COLORS = {"save": "#2e7d32", "crash": "#c62828", "resume": "#1565c0", "prune": "#8d8d8d",
               "preempt": "#ef6c00"}
MAX_POINTS = 2000


def _downsample(points: list[list[float]], limit: int = MAX_POINTS) -> list[list[float]]:
    """Every k-th point plus the last, so a long run's path stays a few KB."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    out = points[::stride]
    return out if out[-1] is points[-1] else out + [points[-1]]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(metric: str, points: list[list[float]], marks: list[dict[str, Any]], *,
               width: int = 720, height: int = 220) -> str:
    """One metric's curve over steps, with vertical marks for saves, crashes, resumes, prunes."""
    if not points:
        return f'<p class="empty">no values of {escape(metric)} logged yet</p>'
    left, right, top, bottom = 58, 14, 16, 30
    steps = [p[0] for p in points]
    x0, x1 = min(steps), max(steps)
    marks = [m for m in marks if x0 <= m["step"] <= x1]
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    values = [p[1] for p in points]
    y0, y1 = min(values), max(values)
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    inner_w, inner_h = width - left - right, height - top - bottom

    def sx(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * inner_w

    def sy(value: float) -> float:
        return top + (1 - (value - y0) / (y1 - y0)) * inner_h

    shown = _downsample(points)
    d = "M" + " L".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in shown)
    parts = [f'<svg class="chart" data-metric="{escape(metric)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{escape(metric)} by step" '
             'xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(metric)} by step (stitched across restarts)</title>",
             f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" fill="#fff" stroke="#ccc"/>']
    for m in marks:
        x = sx(m["step"])
        color = MARK_COLORS.get(m["kind"], "#555")
        tip = f"<title>{escape(m['label'])}</title>"
        if m["kind"] in ("save", "prune"):  # frequent: short ticks under the plot
            y = top + inner_h + (0 if m["kind"] == "save" else 6)
            parts.append(f'<line class="mark mark-{m["kind"]}" x1="{x:.1f}" x2="{x:.1f}" y1="{y - 6}" y2="{y}" '
                         f'stroke="{color}" stroke-width="2">{tip}</line>')
        else:
            dash = ' stroke-dasharray="4 3"' if m["kind"] == "resume" else ""
            parts.append(f'<line class="mark mark-{m["kind"]}" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                         f'y2="{top + inner_h}" stroke="{color}" stroke-width="1.5"{dash}>{tip}</line>')
    parts.append(f'<path class="curve" d="{d}" data-points="{len(shown)}" fill="none" stroke="#333" '
                 'stroke-width="1.5" stroke-linejoin="round"/>')
    axis = 'font-size="11" fill="#555" font-family="sans-serif"'
    parts += [f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" {axis}>{_fmt(y1)}</text>',
              f'<text x="{left - 4}" y="{top + inner_h}" text-anchor="end" {axis}>{_fmt(y0)}</text>',
              f'<text x="{left}" y="{height - 4}" {axis}>step {x0:g}</text>',
              f'<text x="{left + inner_w}" y="{height - 4}" text-anchor="end" {axis}>step {x1:g}</text>',
              f'<text x="{left + inner_w / 2}" y="{height - 4}" text-anchor="middle" {axis}>{escape(metric)}</text>',
              "</svg>"]
    return "".join(parts)


def legend() -> str:
    names = {"save": "save", "crash": "crash", "resume": "resume", "prune": "prune", "preempt": "signal: save and stop"}
    return '<p class="legend">' + " ".join(
        f'<span><i style="background:{MARK_COLORS[k]}"></i>{v}</span>' for k, v in names.items()) + "</p>"
