"""HTML for the dashboard: whole pages on first load, fragments for the live updates.

Rendering stays on the server (one place that formats sizes, flags and charts); the page's only
script is the few lines below, inline: poll the run's JSON endpoint every few seconds and swap in
the fragments it carries, and post actions with the token. Everything interpolated is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from ..disk import format_size
from .charts import legend, line_chart

POLL_SECONDS = 3

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1200px}
h1{font-size:1.3rem}h2{font-size:1.05rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border-bottom:1px solid #e3e3e3;padding:.25rem .6rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.flag{display:inline-block;border-radius:3px;padding:0 .3rem;margin-right:.2rem;background:#eceff1;font-size:.8rem}
.flag.corrupt,.flag.verify{background:#ffcdd2}.flag.pinned{background:#fff59d}.flag.best{background:#c8e6c9}
.flag.mirrored{background:#bbdefb}button{font-size:.8rem;margin-right:.2rem}
.bar{width:420px;height:12px;background:#eee;border-radius:3px;overflow:hidden}.bar>div{height:100%;background:#546e7a}
.bar.over>div{background:#c62828}#status{min-height:1.2rem;font-weight:600}#status.error{color:#c62828}
.legend span{margin-right:1rem;font-size:.85rem}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
.live{color:#2e7d32}.muted{color:#777}
"""

SCRIPT = """
(() => {
  const body = document.body, api = body.dataset.api, act = body.dataset.act;
  const params = new URLSearchParams(location.search);
  if (params.get('token')) { sessionStorage.setItem('safepoint-token', params.get('token'));
    params.delete('token'); history.replaceState(null, '', location.pathname + (params.size ? '?' + params : '')); }
  const status = (text, error) => { const s = document.getElementById('status');
    if (s) { s.textContent = text; s.className = error ? 'error' : ''; } };
  async function refresh() {
    if (!api) return;
    try { const r = await fetch(api, {cache: 'no-store'}); if (!r.ok) return;
      const j = await r.json();
      for (const [id, html] of Object.entries(j.html)) { const el = document.getElementById(id); if (el) el.innerHTML = html; }
      body.dataset.updated = String(Date.now());
    } catch (e) { /* server restarting: try again at the next tick */ }
  }
  async function action(name, step) {
    if (name === 'delete' && !confirm('Delete checkpoint step ' + step + '? This cannot be undone.')) return;
    const token = sessionStorage.getItem('safepoint-token') || (document.getElementById('token') || {}).value || '';
    status(name + ' ...');
    const r = await fetch(act.replace('ACTION', name), {method: 'POST',
      headers: {'Content-Type': 'application/json', 'X-Safepoint-Token': token},
      body: JSON.stringify({step: step === '' || step === undefined ? null : Number(step),
                            confirm: name === 'delete' ? Number(step) : null})});
    let j = {}; try { j = await r.json(); } catch (e) {}
    await refresh();  // the table first: once the message shows, the page agrees with it
    status(r.ok ? (j.message || 'done') : ('refused: ' + (j.error || r.status)), !r.ok);
  }
  document.addEventListener('click', (e) => { const b = e.target.closest('button[data-action]');
    if (b) action(b.dataset.action, b.dataset.step); });
  const t = document.getElementById('token');
  if (t) t.addEventListener('change', () => sessionStorage.setItem('safepoint-token', t.value));
  if (api) setInterval(refresh, %d);
})();
""" % (POLL_SECONDS * 1000)


def page(title: str, content: str, *, api: str = "", act: str = "", token_required: bool = False) -> str:
    token = ('<p class="muted">actions need the token: <input id="token" type="password" size="24" '
             'placeholder="token"> (or open the page with ?token=...)</p>') if token_required else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body data-api="{escape(api)}" data-act="{escape(act)}">{token}{content}'
            f"<script>{SCRIPT}</script></body></html>")


def run_href(name: str) -> str:
    return "/run/" + quote(name)


def index_page(root: str, runs: list[dict[str, Any]], token_required: bool) -> str:
    rows = "".join(
        f'<tr><td><a href="{escape(run_href(r["path"]))}">{escape(r["name"])}</a></td><td>{escape(r["kind"])}</td>'
        f'<td class="num">{r["checkpoints"]}</td><td class="num">{r["newest_step"] if r["newest_step"] is not None else ""}'
        f'</td><td>{escape(_time(r["newest_time"]))}</td><td class="num">{format_size(r["size"])}</td>'
        f'<td>{"corrupt: " + str(r["corrupt"]) if r["corrupt"] else ""}</td></tr>' for r in runs)
    table = ("<table><tr><th>run</th><th>kind</th><th>checkpoints</th><th>newest step</th><th>newest</th>"
             f"<th>size</th><th></th></tr>{rows}</table>" if runs else "<p>no runs found here yet</p>")
    return page(f"safepoint: {root}", f"<h1>Runs in {escape(root)}</h1>{table}"
                '<p class="muted"><a href="/metrics">/metrics</a> (Prometheus)</p>', token_required=token_required)


def _time(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def _flag(name: str) -> str:
    cls = name.split("(")[0].split(" ")[0]
    return f'<span class="flag {escape(cls)}">{escape(name)}</span>'


def _button(action: str, step: int | None, label: str = "", title: str = "") -> str:
    tip = f' title="{escape(title)}"' if title else ""
    return f'<button data-action="{action}" data-step="{"" if step is None else step}"{tip}>{label or action}</button>'


def checkpoints_html(listing: dict[str, Any], can_export: bool) -> str:
    metrics = listing["metrics"]
    head = "".join(f"<th>{escape(m)}</th>" for m in metrics)
    rows = []
    for c in reversed(listing["checkpoints"]):
        values = "".join(f'<td class="num">{_metric(c["metrics"].get(m))}</td>' for m in metrics)
        protected = ", ".join(c["protected"])
        buttons = (_button("unpin", c["step"]) if "pinned" in c["flags"] else _button("pin", c["step"])) \
            + _button("verify", c["step"]) + (_button("export", c["step"]) if can_export else "") \
            + _button("delete", c["step"], title=f"protected: {protected}" if protected else "")
        verified = c.get("verified")
        note = f' <span class="muted">{"verified" if verified[0] else "FAILED: " + escape(verified[1])}</span>' \
            if verified else ""
        rows.append(f'<tr data-step="{c["step"]}"><td class="num">{c["step"]}</td><td>{escape(_time(c["time"]))}</td>'
                    f'<td class="num">{format_size(c["size"])}</td>{values}'
                    f'<td>{"".join(_flag(f) for f in c["flags"])}{note}</td><td>{buttons}</td></tr>')
    blanks = "<td></td>" * len(metrics)
    for c in (c for c in listing["corrupt"] if not c["listed"]):
        rows.append(f'<tr data-step="{c["step"]}"><td class="num">{c["step"]}</td><td></td><td></td>{blanks}'
                    f'<td>{_flag("corrupt")} {escape(c["reason"])}</td><td>{_button("delete", c["step"])}</td></tr>')
    for d in listing["debris"]:
        rows.append(f'<tr><td></td><td></td><td class="num">{format_size(d["size"])}</td>{blanks}'
                    f'<td class="muted">{escape(d["what"])}: {escape(d["path"].rsplit("/", 1)[-1])}</td><td></td></tr>')
    if not rows:
        return "<p>no checkpoints yet</p>"
    return (f"<table><tr><th>step</th><th>committed</th><th>size</th>{head}<th>state</th><th>actions</th></tr>"
            + "".join(rows) + "</table>"
            + f'<p>{_button("verify", None, "verify all")}</p>')


def _metric(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, (int, float)) else escape(str(value))


def charts_html(state: dict[str, Any]) -> str:
    if not state["curves"]:
        return "<p>no metrics logged yet</p>"
    return legend() + "".join(f"<div>{line_chart(name, pts, state['marks'])}</div>"
                              for name, pts in state["curves"].items())


def _bar(used: int, total: int | None) -> str:
    if not total:
        return ""
    share = min(1.0, used / total)
    over = " over" if used > total else ""
    return f'<div class="bar{over}"><div style="width:{share * 100:.1f}%"></div></div>'


def disk_html(listing: dict[str, Any]) -> str:
    run, budget = listing["run_size"], listing["max_disk"]
    free, total = listing["fs_free"], listing["fs_total"]
    lines = [f"<p>run: {format_size(run)}" + (f" of budget (max_disk) {format_size(budget)}" if budget is not None
                                             else " (no budget recorded: run.json has no max_disk)") + "</p>",
             _bar(run, budget),
             f"<p>filesystem: {format_size(free)} free of {format_size(total)}</p>", _bar(total - free, total)]
    if listing.get("has_mirror"):
        unmirrored = [c["step"] for c in listing["checkpoints"] if c["step"] not in listing["mirrored"]]
        lines.append(f"<p>mirror: {len(listing['mirrored'])} mirrored"
                     + (f"; not yet: {', '.join(map(str, unmirrored))}" if unmirrored else "; up to date") + "</p>")
    return "".join(lines)


def restarts_html(state: dict[str, Any]) -> str:
    crashed = [a for a in state["attempts"] if a["crashed"]]
    if not state["attempts"]:
        summary = '<p class="muted">no attempts recorded (events.jsonl has no start events)</p>'
    else:
        summary = (f"<p>{len(state['attempts'])} attempt{'s' if len(state['attempts']) != 1 else ''} opened the run; "
                   f"{len(crashed)} ended without closing (crash, kill or OOM)"
                   + ("; one is <span class=live>running now</span>" if state["live"] else "") + "</p>")
    if not state["restarts"]:
        return summary + '<p class="muted">no supervisor records (start the run with safepoint run to get them)</p>'
    rows = "".join(f'<tr class="sv-{escape(r["event"])}"><td>{escape(_time(r["time"]))}</td><td>{escape(r["event"])}'
                   f'</td><td class="num">{r["n"] if r["n"] is not None else ""}</td><td>{escape(r["what"])}</td></tr>'
                   for r in state["restarts"])
    return summary + f"<table><tr><th>time</th><th>event</th><th>child</th><th>what</th></tr>{rows}</table>"


def run_fragments(state: dict[str, Any], can_export: bool) -> dict[str, str]:
    live = '<span class="live">live</span>' if state["live"] else '<span class="muted">not running</span>'
    return {"checkpoints": checkpoints_html(state["listing"], can_export), "charts": charts_html(state),
            "disk": disk_html(state["listing"]), "restarts": restarts_html(state), "live": live}


def run_page(state: dict[str, Any], *, api: str, act: str, can_export: bool, token_required: bool) -> str:
    listing = state["listing"]
    kind = "safepoint run" if listing["kind"] == "safepoint" else "Hugging Face output"
    f = run_fragments(state, can_export)
    content = (f'<p><a href="/">all runs</a></p><h1>{escape(listing["directory"])} <small class="muted">({kind})'
               f'</small> <small id="live">{f["live"]}</small></h1><div id="status"></div>'
               f'<h2>Checkpoints</h2><div id="checkpoints">{f["checkpoints"]}</div>'
               f'<h2>Curves</h2><div id="charts">{f["charts"]}</div>'
               f'<h2>Disk</h2><div id="disk">{f["disk"]}</div>'
               f'<h2>Restarts</h2><div id="restarts">{f["restarts"]}</div>')
    return page(f"safepoint: {listing['directory']}", content, api=api, act=act, token_required=token_required)
