"""``safepoint serve``'s HTTP API, through FastAPI's TestClient, on runs the real library wrote.

The dashboard must agree with ``safepoint ls``, stitch a curve across a crash correctly (the
resumed attempt's values win), refuse to delete what retention protects (saying why), keep every
request inside the served directory, and keep its actions behind the token and away from other
web pages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the dashboard extra is not installed: pip install 'safepoint[dashboard]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dashboard_runs import loss, make_hf_output, make_run  # noqa: E402
from safepoint import layout  # noqa: E402
from safepoint.cli import app as cli_app  # noqa: E402
from safepoint.dashboard import create_app  # noqa: E402
from safepoint.dashboard.history import read_history, stitch  # noqa: E402
from safepoint.dashboard.server import check_bind  # noqa: E402

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    base = tmp_path_factory.mktemp("dash")
    pids = make_run(base / "exp1")
    make_hf_output(base / "hf-out")
    return base, pids


@pytest.fixture
def root(made: tuple[Path, dict[str, int]], tmp_path: Path) -> Path:
    """A private copy of the served directory, so actions cannot leak between tests."""
    copy = tmp_path / "served"
    shutil.copytree(made[0], copy, ignore=shutil.ignore_patterns(layout.LOCK_FILE))
    return copy


@pytest.fixture
def client(root: Path) -> TestClient:
    return TestClient(create_app(root), base_url=LOCAL)


def post(client: TestClient, action: str, run: str, **body: object) -> tuple[int, dict]:
    r = client.post(f"/api/action/{action}/{run}", json=body)
    return r.status_code, r.json()


# ----------------------------------------------------------------------------- reading


def test_the_index_lists_every_run_kind(client: TestClient) -> None:
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"exp1", "hf-out"}
    assert runs["exp1"]["kind"] == "safepoint" and runs["exp1"]["checkpoints"] == 4
    assert runs["exp1"]["newest_step"] == 40
    assert runs["hf-out"]["kind"] == "hf" and runs["hf-out"]["newest_step"] == 10
    page = client.get("/")
    assert page.status_code == 200 and 'href="/run/exp1"' in page.text and 'href="/run/hf-out"' in page.text


def test_a_single_run_is_served_directly(made: tuple[Path, dict[str, int]]) -> None:
    single = TestClient(create_app(made[0] / "exp1"), base_url=LOCAL)
    r = single.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/run/"
    assert single.get("/api/run/").json()["listing"]["kind"] == "safepoint"


def test_the_checkpoint_table_is_what_safepoint_ls_shows(client: TestClient, root: Path) -> None:
    ls = json.loads(CliRunner().invoke(cli_app, ["ls", str(root / "exp1"), "--json"]).output)
    state = client.get("/api/run/exp1").json()
    got = state["listing"]["checkpoints"]
    assert [c["step"] for c in got] == [c["step"] for c in ls["checkpoints"]] == [10, 20, 30, 40]
    assert [c["flags"] for c in got] == [c["flags"] for c in ls["checkpoints"]]
    assert [c["size"] for c in got] == [c["size"] for c in ls["checkpoints"]]
    flags = {c["step"]: c["flags"] for c in got}
    assert "resumed-from" in flags[20] and "best(loss)" in flags[40] and "committed" in flags[10]
    assert {c["step"]: c["protected"] for c in got}[40] == ["newest", "best(acc)", "best(loss)"]
    assert state["listing"]["max_disk"] == 50_000_000
    html = state["html"]["checkpoints"]
    for step in (10, 20, 30, 40):
        assert f'<tr data-step="{step}">' in html


def test_the_curve_is_stitched_across_the_crash(client: TestClient, made: tuple[Path, dict[str, int]]) -> None:
    state = client.get("/api/run/exp1").json()
    curve = dict((s, v) for s, v in state["curves"]["loss"])
    assert sorted(curve) == list(range(1, 41))  # every step once
    assert all(curve[s] == loss(s, 1) for s in range(1, 21))  # only attempt 1 logged these
    assert all(curve[s] == loss(s, 2) for s in range(21, 41))  # the resumed attempt wins 21..25
    assert list(state["curves"]) == ["loss", "acc"]
    marks = {(m["kind"], m["step"]) for m in state["marks"]}
    assert {("save", 10), ("save", 20), ("save", 30), ("save", 40), ("resume", 20), ("crash", 25)} <= marks
    crash = next(m for m in state["marks"] if m["kind"] == "crash")
    assert f"pid {made[1]['attempt_1']}" in crash["label"] and "killed by SIGKILL" in crash["label"]
    attempts = state["attempts"]
    assert [a["crashed"] for a in attempts] == [True, False] and attempts[1]["resumed_from"] == 20
    assert state["live"] is False
    svg = state["html"]["charts"]
    assert svg.count('<path class="curve"') == 2 and 'data-points="40"' in svg
    assert svg.count('class="mark mark-crash"') == 2  # on both charts


def test_the_restart_history_comes_from_the_supervisor(client: TestClient) -> None:
    rows = client.get("/api/run/exp1").json()["restarts"]
    assert [r["event"] for r in rows] == ["supervisor_start", "child_start", "child_exit", "restart", "child_start",
                                          "child_exit", "supervisor_exit"]
    assert "killed by SIGKILL" in rows[2]["what"] and "clean exit" in rows[5]["what"]
    html = client.get("/run/exp1").text
    assert "restarting in 1.0s" in html and "2 attempts opened the run; 1 ended without closing" in html


def test_a_live_attempt_is_not_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"time": "t", "event": "start", "attempt": "a1", "pid": 2**22 + 7},  # no such process: crashed
             {"time": "t", "event": "start", "attempt": "a2", "pid": os.getpid()}]  # this one is running
    (run / layout.EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"torn": ')
    history = read_history(run)
    assert [(a.crashed, a.live) for a in history.attempts] == [(True, False), (False, True)]


def test_stitch_takes_each_step_from_the_latest_attempt() -> None:
    lines = [{"step": 1, "attempt": "a", "loss": 1.0}, {"step": 2, "attempt": "a", "loss": 2.0},
             {"step": 3, "attempt": "a", "loss": 3.0}, {"step": 2, "attempt": "b", "loss": 20.0},
             {"step": 3, "attempt": "b", "loss": "nan"}, {"step": 4, "attempt": "b", "loss": 40.0, "lr": 0.1},
             {"step": "x", "loss": 9.0}]
    assert stitch(lines) == {"loss": [(1, 1.0), (2, 20.0), (4, 40.0)], "lr": [(4, 0.1)]}


def test_hugging_face_output_dirs_get_their_log_history(client: TestClient) -> None:
    state = client.get("/api/run/hf-out").json()
    assert state["listing"]["kind"] == "hf" and [c["step"] for c in state["listing"]["checkpoints"]] == [5, 10]
    assert [s for s, _ in state["curves"]["loss"]] == list(range(1, 11))
    assert "epoch" not in state["curves"]
    assert client.get("/run/hf-out").status_code == 200


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("path", ["/run/..%2F..%2Fetc", "/run/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/api/run/..%2F..",
                                  "/run/%2Fetc", "/run/exp1%2F..%2F..%2F..", "/run/exp1/step_00000010",
                                  "/run/nonexistent", "/api/run/exp1%00"])
def test_paths_outside_the_served_directory_are_404(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404
    if path.startswith("/run/"):
        r = client.post("/api/action/pin/" + path.removeprefix("/run/"), json={"step": 10})
        assert r.status_code == 404


def test_a_real_run_outside_the_served_directory_is_404(client: TestClient, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(root / "exp1", outside)  # a real run, but not under the served directory
    (root / "link").symlink_to(outside)
    assert client.get(f"/api/run/..%2F{outside.name}").status_code == 404  # a real run, one `..` away
    assert client.get(f"/run/exp1%2F..%2F..%2F{outside.name}").status_code == 404
    assert client.post(f"/api/action/pin/..%2F{outside.name}", json={"step": 10}).status_code == 404
    assert client.get("/api/run/link").status_code == 404
    assert client.post("/api/action/pin/link", json={"step": 10}).status_code == 404
    assert "link" not in {r["name"] for r in client.get("/api/runs").json()["runs"]}


# ----------------------------------------------------------------------------- actions


def test_pin_and_unpin_write_run_json(client: TestClient, root: Path) -> None:
    assert post(client, "pin", "exp1", step=30) == (200, {"message": "pinned step 30"})
    assert json.loads((root / "exp1" / layout.RUN_FILE).read_text())["pins"] == [30]
    assert "pinned" in client.get("/api/run/exp1").json()["listing"]["checkpoints"][2]["flags"]
    assert post(client, "unpin", "exp1", step=30)[0] == 200
    assert json.loads((root / "exp1" / layout.RUN_FILE).read_text())["pins"] == []
    status, body = post(client, "pin", "exp1", step=35)
    assert status == 404 and "no checkpoint for step 35" in body["error"]


def test_delete_needs_confirmation_and_refuses_protected_checkpoints(client: TestClient, root: Path) -> None:
    status, body = post(client, "delete", "exp1", step=40, confirm=40)
    assert status == 409 and "protected (newest, best(acc), best(loss))" in body["error"]
    status, body = post(client, "delete", "exp1", step=20, confirm=20)
    assert status == 409 and "resumed-from" in body["error"]
    post(client, "pin", "exp1", step=10)
    status, body = post(client, "delete", "exp1", step=10, confirm=10)
    assert status == 409 and "pinned" in body["error"]
    status, body = post(client, "delete", "exp1", step=30)
    assert status == 409 and "confirmation" in body["error"]
    assert (root / "exp1" / "step_00000030").is_dir()
    assert post(client, "delete", "exp1", step=30, confirm=30) == (200, {"message": "deleted step 30"})
    assert not (root / "exp1" / "step_00000030").exists()
    events = [json.loads(x) for x in (root / "exp1" / layout.EVENTS_FILE).read_text().splitlines()]
    assert events[-1]["event"] == "prune" and events[-1]["step"] == 30 and events[-1]["by"] == "dashboard"
    assert [c["step"] for c in client.get("/api/run/exp1").json()["listing"]["checkpoints"]] == [10, 20, 40]


def test_delete_is_refused_while_a_writer_holds_the_run(client: TestClient, root: Path) -> None:
    from safepoint.lock import RunLock

    lock = RunLock(root / "exp1")
    lock.acquire()
    try:
        status, body = post(client, "delete", "exp1", step=30, confirm=30)
    finally:
        lock.release()
    assert status == 409 and "in use by another safepoint writer" in body["error"]
    assert (root / "exp1" / "step_00000030").is_dir()


def test_verify_finds_a_damaged_checkpoint(client: TestClient, root: Path) -> None:
    status, body = post(client, "verify", "exp1", step=None)
    assert status == 200 and body["ok"] and body["message"] == "4 checkpoints verified"
    victim = root / "exp1" / "step_00000030" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    status, body = post(client, "verify", "exp1", step=30)
    assert status == 200 and not body["ok"] and "step 30" in body["message"] and "hash" in body["message"]
    flags = client.get("/api/run/exp1").json()["listing"]["checkpoints"][2]["flags"]
    assert "verify failed" in flags


def test_export_writes_weights_inside_the_run(client: TestClient, root: Path) -> None:
    from safetensors.torch import load_file

    status, body = post(client, "export", "exp1", step=40, dtype="bf16")
    assert status == 200, body
    out = root / "exp1" / "exports" / "step_00000040-bf16"
    assert Path(body["path"]) == out
    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == ["bias", "weight"] and {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    assert post(client, "export", "exp1", step=40, dtype="int3")[0] == 409
    assert post(client, "export", "exp1", step=40, dtype="bf16")[0] == 400  # exists already: not overwritten


def test_unknown_actions_and_bad_bodies(client: TestClient) -> None:
    assert post(client, "format", "exp1", step=1)[0] == 404
    assert client.post("/api/action/pin/exp1", json=[10]).status_code == 400
    assert post(client, "pin", "exp1", step="10")[0] == 400
    assert post(client, "pin", "exp1")[0] == 400


# ----------------------------------------------------------------------------- security


def test_actions_need_json_and_the_same_origin(client: TestClient, root: Path) -> None:
    r = client.post("/api/action/pin/exp1", content="step=10", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = client.post("/api/action/pin/exp1", json={"step": 10}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    assert json.loads((root / "exp1" / layout.RUN_FILE).read_text())["pins"] == []
    r = client.post("/api/action/pin/exp1", json={"step": 10}, headers={"origin": LOCAL})
    assert r.status_code == 200


def test_on_loopback_only_localhost_names_are_answered(root: Path) -> None:
    rebound = TestClient(create_app(root), base_url="http://attacker.example")  # DNS rebinding
    assert rebound.get("/api/runs").status_code == 403
    assert rebound.post("/api/action/pin/exp1", json={"step": 10}).status_code == 403
    assert TestClient(create_app(root), base_url="http://localhost:8080").get("/api/runs").status_code == 200


def test_a_token_guards_every_action(root: Path) -> None:
    client = TestClient(create_app(root, host="0.0.0.0", token="s3cret"), base_url="http://dash.example")
    assert client.get("/api/run/exp1").status_code == 200  # reading stays open (Prometheus, pages)
    assert client.get("/metrics").status_code == 200
    assert post(client, "pin", "exp1", step=10)[0] == 401
    r = client.post("/api/action/pin/exp1", json={"step": 10}, headers={"x-safepoint-token": "wrong"})
    assert r.status_code == 401
    assert json.loads((root / "exp1" / layout.RUN_FILE).read_text())["pins"] == []
    r = client.post("/api/action/pin/exp1", json={"step": 10}, headers={"x-safepoint-token": "s3cret"})
    assert r.status_code == 200
    r = client.post("/api/action/unpin/exp1", json={"step": 10}, headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert 'id="token"' in client.get("/run/exp1").text


def test_serving_beyond_loopback_needs_a_token(root: Path) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    for host in ("0.0.0.0", "192.168.1.5", "myhost"):
        with pytest.raises(ValueError, match="--token"):
            check_bind(host, None)
    check_bind("0.0.0.0", "t")
    result = CliRunner().invoke(cli_app, ["serve", str(root), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "error: serving on 0.0.0.0" in result.output, result.output


# ----------------------------------------------------------------------------- /metrics


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_prometheus_metrics(client: TestClient, root: Path) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = _samples(r.text)
    assert got['safepoint_checkpoints{run="exp1"}'] == 4
    assert got['safepoint_checkpoints{run="hf-out"}'] == 2
    assert got['safepoint_newest_checkpoint_step{run="exp1"}'] == 40
    assert got['safepoint_saves_total{run="exp1"}'] == 4
    assert got['safepoint_last_save_bytes{run="exp1"}'] > 0
    assert got['safepoint_saved_bytes_total{run="exp1"}'] == 4 * got['safepoint_last_save_bytes{run="exp1"}']
    assert 0 < got['safepoint_last_save_duration_seconds{run="exp1"}'] < 60
    assert got['safepoint_restarts_total{run="exp1"}'] == 1 and got['safepoint_attempts_total{run="exp1"}'] == 2
    assert got['safepoint_max_disk_bytes{run="exp1"}'] == 50_000_000
    assert got['safepoint_disk_free_bytes{run="exp1"}'] > 0
    assert not any(k.startswith("safepoint_mirror") for k in got)
    meta = json.loads((root / "exp1" / layout.RUN_FILE).read_text())
    (root / "exp1" / layout.RUN_FILE).write_text(json.dumps({**meta, "mirrored": [10, 20]}))
    got = _samples(client.get("/metrics").text)
    assert got['safepoint_mirror_pending_checkpoints{run="exp1"}'] == 2
    assert got['safepoint_mirror_lag_steps{run="exp1"}'] == 20
    flags = {c["step"]: c["flags"] for c in client.get("/api/run/exp1").json()["listing"]["checkpoints"]}
    assert "mirrored" in flags[20] and "mirrored" not in flags[30]


def test_log_reads_pick_up_appends_and_replacements(tmp_path: Path) -> None:
    from safepoint.dashboard.history import read_jsonl

    log = tmp_path / "events.jsonl"
    log.write_text('{"n": 1}\n{"n": 2}\n{"n": 3, "partial')
    assert read_jsonl(log) == [{"n": 1}, {"n": 2}]  # the line being written waits
    with open(log, "a") as f:
        f.write('": true}\n{"n": 4}\n')
    assert read_jsonl(log) == [{"n": 1}, {"n": 2}, {"n": 3, "partial": True}, {"n": 4}]
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"n": 9}\n')
    replacement.replace(log)  # a new file (new inode) under the same name
    assert read_jsonl(log) == [{"n": 9}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_trainer_output_without_an_event_log_marks_its_checkpoints(client: TestClient) -> None:
    state = client.get("/api/run/hf-out").json()
    assert [(m["kind"], m["step"]) for m in state["marks"]] == [("save", 5), ("save", 10)]
    assert "no attempts recorded" in state["html"]["restarts"]
