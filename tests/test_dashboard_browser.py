"""The dashboard in a real browser: headless Debian chromium driven by Playwright.

The real ``safepoint serve`` runs as a subprocess on a free port over a run the library wrote (a
crash, a resume, supervisor records). The page must show the right checkpoints and a stitched
curve, pin from a click (run.json on disk changes), refuse a protected delete with its reason,
pick up a new checkpoint without a reload, and answer 404 to a path out of the served directory.
A screenshot lands in ``test-artifacts/``. Skipped, with the reason, where chromium or Playwright
is missing (``make test`` installs both).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (/usr/bin/chromium): apt-get install -y chromium",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright")
pytest.importorskip("fastapi", reason="the dashboard extra is not installed: pip install 'safepoint[dashboard]'")
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

import torch  # noqa: E402

from conftest import ROOT, train_env  # noqa: E402
from dashboard_runs import make_run  # noqa: E402
from safepoint import CheckpointManager, KeepLast, layout  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    make_run(root / "exp1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "safepoint", "serve", str(root), "--port", str(port)],
                            env=train_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/api/runs", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"safepoint serve did not come up:\n{proc.communicate()[0]}")
            time.sleep(0.1)
    try:
        yield base, root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    try:
        yield page
    finally:
        context.close()


def rows(page: Page) -> list[int]:
    return [int(s) for s in page.locator("#checkpoints tr[data-step]").evaluate_all(
        "rows => rows.map(r => r.dataset.step)")]


def test_the_run_page_in_a_browser(served, page: Page) -> None:
    base, root = served
    run = root / "exp1"
    page.goto(base + "/")
    page.click("text=exp1")
    expect(page).to_have_url(base + "/run/exp1")
    assert rows(page) == [40, 30, 20, 10]
    expect(page.locator('tr[data-step="20"]')).to_contain_text("resumed-from")
    expect(page.locator('tr[data-step="40"]')).to_contain_text("best(loss)")

    curve = page.locator('svg.chart[data-metric="loss"] path.curve')
    d = curve.get_attribute("d") or ""
    points = [tuple(map(float, p.split(","))) for p in d.lstrip("M").split(" L")]
    assert len(points) == 40 and all(len(p) == 2 for p in points)
    assert [x for x, _ in points] == sorted(x for x, _ in points)  # left to right, one point per step
    assert page.locator('svg.chart[data-metric="loss"] line.mark-crash').count() == 1
    assert page.locator('svg.chart[data-metric="loss"] line.mark-resume').count() == 1
    expect(page.locator("#restarts")).to_contain_text("killed by SIGKILL")
    expect(page.locator("#disk")).to_contain_text("of budget (max_disk) 50.00 MB")

    # Pin from the page: run.json on disk changes, and the table says so.
    page.click('button[data-action="pin"][data-step="30"]')
    expect(page.locator("#status")).to_have_text("pinned step 30")
    assert json.loads((run / layout.RUN_FILE).read_text())["pins"] == [30]
    expect(page.locator('tr[data-step="30"]')).to_contain_text("pinned")

    # A protected checkpoint is not deleted, and the page says why; an unprotected one is.
    page.click('button[data-action="delete"][data-step="40"]')
    expect(page.locator("#status")).to_contain_text("refused: step 40 is protected (newest")
    assert (run / "step_00000040").is_dir()
    page.click('button[data-action="delete"][data-step="10"]')
    expect(page.locator("#status")).to_have_text("deleted step 10")
    assert not (run / "step_00000010").exists()
    assert rows(page) == [40, 30, 20]

    # Live: a checkpoint committed by a training process shows up without a reload.
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(run, every_steps=10, keep=[KeepLast(10)], max_disk="50MB") as ckpt:
        ckpt.restore({"model": model})
        ckpt.step(50, {"model": model}, metrics={"loss": 0.01, "acc": 0.5})
    expect(page.locator('#checkpoints tr[data-step="50"]')).to_be_visible(timeout=15_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)
    assert (ARTIFACTS / "dashboard-run.png").stat().st_size > 10_000


def test_a_forbidden_path_is_404_in_the_browser(served, page: Page) -> None:
    base, root = served
    outside = root.parent / (root.name + "-outside")
    shutil.copytree(root / "exp1", outside, ignore=shutil.ignore_patterns(layout.LOCK_FILE))
    for path in ["/run/..%2F..%2Fetc", f"/run/..%2F{outside.name}", "/run/..%2F..%2F..%2F..%2Fetc%2Fpasswd"]:
        response = page.goto(base + path)
        assert response is not None and response.status == 404, path
    response = page.goto(base + "/metrics")
    assert response is not None and response.status == 200
    assert 'safepoint_checkpoints{run="exp1"}' in page.content()
