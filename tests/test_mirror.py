"""The object-storage mirror against a real S3 server (SeaweedFS, see ``s3_server.py``).

Upload / verify / restore round trips, uploads that never block training, the server killed while an
upload is in flight and restarted, a fresh empty machine resuming bitwise-exactly from the mirror, a
corrupted remote object caught on pull and skipped by restore, remote retention, local retention
that never drops an unmirrored checkpoint, push/pull by hand, and start-up errors.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest_plugins = ["s3_server"]

from safepoint import CheckpointManager, DirectoryLocked, KeepEvery, KeepLast, SafepointWarning  # noqa: E402
from safepoint.catalog import list_checkpoints, read_run_meta, verify  # noqa: E402
from safepoint.errors import CorruptCheckpoint, MirrorError  # noqa: E402
from safepoint.mirror import (MirrorConfig, Progress, delete_remote_checkpoint, list_remote, pull, push,  # noqa: E402
                              unmirrored_steps)
from safepoint.retention import budget_candidates, plan_deletions, protected_steps  # noqa: E402
from safepoint.storage import RetryPolicy, Storage  # noqa: E402

FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)


# --------------------------------------------------------------------------- helpers


class Big(nn.Module):
    """12 MiB of weights: uploaded in three parts of 5 MiB (multipart) when part_size is 5 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3 * (1 << 20)))


def make_state(seed: int = 0, big: bool = False) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    state: dict[str, Any] = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             "extra": {"seen": 0}}
    if big:
        state["big"] = Big()
    return state


def train(state: dict[str, Any], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    loss = nn.functional.mse_loss(state["model"](x), y)
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()
    state["extra"]["seen"] += 16
    if "big" in state:
        with torch.no_grad():
            state["big"].w.add_(float(step))


def weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in state["model"].state_dict().items()}
    if "big" in state:
        out["big.w"] = state["big"].w.detach().clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def open_manager(path: Path, **kw: Any) -> CheckpointManager:
    kw.setdefault("signals", ())
    return CheckpointManager(path, **kw)


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if kind is None or e["event"] == kind]


def local_steps(run_dir: Path) -> list[int]:
    return [c.step for c in list_checkpoints(run_dir)]


def remote_steps(url: str, options: dict[str, Any] | None = None) -> list[int]:
    return [r.step for r in list_remote(Storage(url, options))]


def mirrored(run_dir: Path) -> list[int]:
    return read_run_meta(run_dir).get("mirrored", [])


@pytest.fixture(params=["s3", "file"])
def mirror_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'mirror'}"
    return request.getfixturevalue("s3_url")


class GatedUploads:
    """Holds every data-file upload until ``release()``: the uploader is busy, training is not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls: list[str] = []
        original = Storage.put_file

        def put_file(storage: Storage, local: Any, key: str, **kw: Any) -> None:
            self.calls.append(key)
            self.started.set()
            assert self.gate.wait(60), "gate never released"
            original(storage, local, key, **kw)

        monkeypatch.setattr(Storage, "put_file", put_file)

    def release(self) -> None:
        self.gate.set()


# --------------------------------------------------------------------------- round trip


def test_upload_verify_restore_round_trip(mirror_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=mirror_url) as ckpt:
        assert ckpt.restore(state) == 0
        for step in (1, 2, 3):
            train(state, step)
            ckpt.save(step, state)
    assert mirrored(tmp_path / "a") == [1, 2, 3]
    assert [e["step"] for e in events(tmp_path / "a", "upload")] == [1, 2, 3] or \
        sorted(e["step"] for e in events(tmp_path / "a", "upload")) == [1, 2, 3]
    assert [c.mirrored for c in list_checkpoints(tmp_path / "a")] == [True, True, True]
    assert read_run_meta(tmp_path / "a")["mirror"] == mirror_url
    remote = list_remote(Storage(mirror_url))
    assert [r.step for r in remote] == [1, 2, 3]
    for r in remote:  # the remote commit record is the local one, byte for byte
        assert r.manifest_bytes == (tmp_path / "a" / f"step_{r.step:08d}" / "manifest.json").read_bytes()

    fresh = make_state(seed=99)
    with open_manager(tmp_path / "b", mirror=mirror_url) as ckpt:
        assert ckpt.restore(fresh) == 3
        assert ckpt.restore_report.path == tmp_path / "b" / "step_00000003"
        train(fresh, 4)
        train(state, 4)
        ckpt.save(4, fresh)
    assert_same(weights(fresh), weights(state))
    assert fresh["extra"] == state["extra"] == {"seen": 64}
    verify(tmp_path / "b" / "step_00000003")
    assert [e["step"] for e in events(tmp_path / "b", "download")] == [3]
    assert mirrored(tmp_path / "b") == [3, 4] and remote_steps(mirror_url) == [1, 2, 3, 4]
    assert not [p for p in (tmp_path / "b").iterdir() if ".tmp-" in p.name]


def test_multipart_upload_round_trip(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0, big=True)
    config = MirrorConfig(s3_url, part_size=5 << 20)
    with open_manager(tmp_path / "a", mirror=config) as ckpt:
        ckpt.restore(state)
        train(state, 1)
        ckpt.save(1, state)
    info = Storage(s3_url).info("step_00000001/big.safetensors")
    assert info is not None and info.etag and info.etag.endswith("-3")  # it went up in three parts
    fresh = make_state(5, big=True)
    with open_manager(tmp_path / "b", mirror=config) as ckpt:
        assert ckpt.restore(fresh) == 1
    assert_same(weights(fresh), weights(state))


# --------------------------------------------------------------------------- never blocking, never losing


def test_uploads_never_block_training_and_retention_keeps_unmirrored(
        s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = GatedUploads(monkeypatch)
    state = make_state(0)
    ckpt = open_manager(tmp_path / "a", keep=[KeepLast(1)], mirror=s3_url)
    try:
        ckpt.restore(state)
        started = time.monotonic()
        for step in (1, 2, 3):
            train(state, step)
            ckpt.save(step, state)  # returns once committed locally, while the upload is held
        assert time.monotonic() - started < 20
        assert gate.started.wait(10)
        # Nothing is mirrored yet, so KeepLast(1) must not delete anything.
        assert mirrored(tmp_path / "a") == [] and local_steps(tmp_path / "a") == [1, 2, 3]
        assert unmirrored_steps(tmp_path / "a") == {1, 2, 3}
        assert protected_steps(list_checkpoints(tmp_path / "a"), resumed_from=None,
                               unmirrored=unmirrored_steps(tmp_path / "a")) == {1, 2, 3}
        gate.release()
    finally:
        gate.release()
        ckpt.close()  # waits for the uploads, then retention runs once more
    assert mirrored(tmp_path / "a") == [1, 2, 3]
    assert remote_steps(s3_url) == [1, 2, 3]
    assert local_steps(tmp_path / "a") == [3]


def test_mirror_keep_local_uses_local_disk_as_a_cache(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=s3_url, mirror_keep_local=2) as ckpt:
        ckpt.restore(state)
        for step in range(1, 6):
            train(state, step)
            ckpt.save(step, state)
            ckpt._mirror.wait(30)
    assert remote_steps(s3_url) == [1, 2, 3, 4, 5]
    assert local_steps(tmp_path / "a") == [4, 5]
    assert {e["step"] for e in events(tmp_path / "a", "prune")} == {1, 2, 3}


def test_failed_upload_warns_keeps_local_copy_leaves_no_remote_manifest_and_catches_up(
        s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Storage.put_file
    broken = {"on": True}

    def put_file(storage: Storage, local: Any, key: str, **kw: Any) -> None:
        if broken["on"] and key.endswith("optimizer.safetensors"):
            raise ConnectionResetError("connection reset by peer (injected)")
        original(storage, local, key, **kw)

    monkeypatch.setattr(Storage, "put_file", put_file)
    state = make_state(0)
    ckpt = open_manager(tmp_path / "a", keep=[KeepLast(1)], mirror=MirrorConfig(s3_url, retry=FAST))
    try:
        ckpt.restore(state)
        train(state, 1)
        with pytest.warns(SafepointWarning, match=r"upload of step 1 to s3://.* failed: ConnectionResetError"):
            ckpt.save(1, state)
            assert ckpt._mirror.wait(30)
        failed = events(tmp_path / "a", "upload_failed")
        assert failed and failed[-1]["step"] == 1 and failed[-1]["transient"] is True
        store = Storage(s3_url)
        assert store.info("step_00000001/manifest.json") is None  # not committed remotely
        assert store.info("step_00000001/model.safetensors") is not None  # (data went up first)
        assert remote_steps(s3_url) == [] and mirrored(tmp_path / "a") == []
        train(state, 2)
        with pytest.warns(SafepointWarning):
            ckpt.save(2, state)
            assert ckpt._mirror.wait(30)
        assert local_steps(tmp_path / "a") == [1, 2]  # KeepLast(1), but neither is mirrored
        broken["on"] = False
        train(state, 3)
        ckpt.save(3, state)  # the next pass uploads 3, 2 and the failed 1
        assert ckpt._mirror.wait(30)
    finally:
        ckpt.close()
    assert remote_steps(s3_url) == [1, 2, 3] and mirrored(tmp_path / "a") == [1, 2, 3]
    assert local_steps(tmp_path / "a") == [3]


def test_close_waits_up_to_its_timeout_and_warns_about_unmirrored(
        s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = GatedUploads(monkeypatch)
    state = make_state(0)
    ckpt = open_manager(tmp_path / "a", mirror=s3_url, mirror_timeout=0.5)
    ckpt.restore(state)
    train(state, 1)
    ckpt.save(1, state)
    assert gate.started.wait(10)
    started = time.monotonic()
    try:
        with pytest.warns(SafepointWarning, match=r"1 checkpoint\(s\) not mirrored to s3://.* \(steps \[1\]"):
            ckpt.close()
    finally:
        gate.release()
    assert time.monotonic() - started < 10
    assert events(tmp_path / "a", "mirror_incomplete")[-1]["steps"] == [1]
    # The next manager uploads it.
    with open_manager(tmp_path / "a", mirror=s3_url) as ckpt:
        ckpt.restore(make_state(0))
    assert mirrored(tmp_path / "a") == [1] and remote_steps(s3_url) == [1]


def test_a_step_saved_again_replaces_its_remote_copy(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=s3_url) as ckpt:
        ckpt.restore(state)
        train(state, 1)
        ckpt.save(1, state)
        ckpt._mirror.wait(30)
        old = Storage(s3_url).get_bytes("step_00000001/manifest.json")
        train(state, 2)
        ckpt.save(1, state)  # explicit save of a step already there: new content
    new = Storage(s3_url).get_bytes("step_00000001/manifest.json")
    assert new != old and new == (tmp_path / "a" / "step_00000001" / "manifest.json").read_bytes()
    fresh = make_state(3)
    with open_manager(tmp_path / "b", mirror=s3_url) as ckpt:
        assert ckpt.restore(fresh) == 1
    assert_same(weights(fresh), weights(state))


# --------------------------------------------------------------------------- the server dies


def test_server_killed_mid_upload_and_restarted(restartable_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """One outage, two runs: "a" retries patiently and its upload resumes by itself once the server
    is back; "c" gives up quickly (a warning, nothing marked, no remote manifest) and catches up
    after its next save. Both keep every unmirrored checkpoint locally despite KeepLast(1)."""
    caplog.set_level("INFO", logger="safepoint")
    server = restartable_s3
    # (botocore's own retries off: ours, with backoff, must carry the uploads across the outage)
    options = {**server.options(), "config_kwargs": {"retries": {"max_attempts": 1}}}
    url_a, url_c = (f"s3://safepoint-test/{name}-{secrets.token_hex(4)}" for name in ("patient", "impatient"))
    original = Storage.put_file
    in_flight, killed = threading.Event(), threading.Event()
    calls: list[str] = []

    def put_file(storage: Storage, local: Any, key: str, **kw: Any) -> None:
        calls.append(storage.url_of(key))
        if storage.url == url_a and key.endswith("optimizer.safetensors") and not in_flight.is_set():
            in_flight.set()  # one data file of "a" is up, this one is on its way: the server dies now
            assert killed.wait(30)
        original(storage, local, key, **kw)

    monkeypatch.setattr(Storage, "put_file", put_file)
    patient = MirrorConfig(url_a, options=options, concurrency=1,
                           retry=RetryPolicy(attempts=40, base_delay=0.1, max_delay=0.4))
    impatient = MirrorConfig(url_c, options=options, retry=RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1))
    state, other = make_state(0), make_state(1)
    a = open_manager(tmp_path / "a", keep=[KeepLast(1)], mirror=patient)
    c = open_manager(tmp_path / "c", keep=[KeepLast(1)], mirror=impatient)
    try:
        a.restore(state)
        c.restore(other)
        train(state, 1)
        a.save(1, state)
        assert in_flight.wait(30)
        server.kill()
        killed.set()
        for step in (2, 3):  # training goes on while the store is down
            train(state, step)
            a.save(step, state)
        train(other, 4)
        with pytest.warns(SafepointWarning, match=rf"upload of step 4 to {url_c} failed"):
            c.save(4, other)
            assert c._mirror.wait(60)
        assert events(tmp_path / "c", "upload_failed")[-1]["transient"] is True
        assert mirrored(tmp_path / "a") == [] and local_steps(tmp_path / "a") == [1, 2, 3]
        assert mirrored(tmp_path / "c") == [] and local_steps(tmp_path / "c") == [4]

        server.start()
        assert a._mirror.wait(60)  # "a" resumes by itself
        assert calls.count(f"{url_a}/step_00000001/optimizer.safetensors") == 1  # one upload, retried inside
        assert [r for r in caplog.records if "step_00000001/optimizer.safetensors" in r.getMessage()
                and "failed (EndpointConnectionError" in r.getMessage()], "the upload was never retried"
        assert remote_steps(url_c, options) == []  # "c" left no remote manifest: not committed there
        train(other, 5)
        c.save(5, other)  # "c" catches up on its next save
        assert c._mirror.wait(60)
    finally:
        a.close()
        c.close()
    assert mirrored(tmp_path / "a") == [1, 2, 3] and remote_steps(url_a, options) == [1, 2, 3]
    assert mirrored(tmp_path / "c") == [4, 5] and remote_steps(url_c, options) == [4, 5]
    assert local_steps(tmp_path / "a") == [3] and local_steps(tmp_path / "c") == [5]
    fresh = make_state(7)
    with open_manager(tmp_path / "b", mirror=patient) as ckpt:
        assert ckpt.restore(fresh, step=1) == 1  # step 1, whose upload the outage interrupted, is whole


# --------------------------------------------------------------------------- a new machine


def test_fresh_empty_directory_resumes_from_mirror_bitwise(s3_url: str, tmp_path: Path, spawn_train,
                                                           reference_weights, same_weights) -> None:
    steps = 300  # as in test_crash_kill9/test_signals: a session computes the reference once
    reference_weights.start(steps)
    first = spawn_train(tmp_path / "machine-1", steps=steps, every=50, sleep=0.01,
                        extra=("--mirror", s3_url, "--crash-at", "175"))
    assert first.wait(120) == 1, first.describe()  # os._exit(1) after step 175: the machine is gone
    committed = remote_steps(s3_url)
    assert committed and set(committed) <= {50, 100, 150} and max(committed) >= 100, committed
    shutil.rmtree(tmp_path / "machine-1")

    out = tmp_path / "final.safetensors"
    second = spawn_train(tmp_path / "machine-2", steps=steps, every=50, out=out, extra=("--mirror", s3_url))
    assert second.wait(120) == 0, second.describe()
    assert second.start_step == max(committed), second.describe()
    same_weights(out, reference_weights.path(steps))
    assert remote_steps(s3_url)[-1] == steps


# --------------------------------------------------------------------------- corruption


def _flip_remote_byte(url: str, key: str) -> None:
    store = Storage(url)
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))


def test_corrupted_remote_object_is_caught_on_pull_and_skipped_by_restore(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=s3_url) as ckpt:
        ckpt.restore(state)
        for step in (1, 2):
            train(state, step)
            ckpt.save(step, state)
            if step == 1:
                at_1 = weights(state)
    _flip_remote_byte(s3_url, "step_00000002/model.safetensors")

    with pytest.warns(SafepointWarning, match="pull of step 2"):
        report = pull(s3_url, tmp_path / "pulled")
    assert report.done == [1] and list(report.failed) == [2] and not report.ok
    assert "step_00000002/model.safetensors fails its check" in report.failed[2] and s3_url in report.failed[2]
    assert local_steps(tmp_path / "pulled") == [1]
    assert not [p for p in (tmp_path / "pulled").iterdir() if p.name.startswith("step_00000002")]

    fresh = make_state(9)
    with open_manager(tmp_path / "b", mirror=s3_url) as ckpt:
        with pytest.warns(SafepointWarning, match=r"skipping checkpoint .*step_00000002.*fails its check"):
            assert ckpt.restore(fresh) == 1
        assert "step_00000002" in ckpt.restore_report.skipped[0]
        with pytest.raises(CorruptCheckpoint, match="step_00000002/model.safetensors"), \
                pytest.warns(SafepointWarning, match="step_00000002"):
            ckpt.restore(make_state(9), step=2)
    assert_same(weights(fresh), at_1)
    assert [e["step"] for e in events(tmp_path / "b", "download_failed")][:1] == [2]


def test_corrupt_local_checkpoint_is_replaced_by_its_mirror_copy(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=s3_url) as ckpt:
        ckpt.restore(state)
        train(state, 1)
        ckpt.save(1, state)
    path = tmp_path / "a" / "step_00000001" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = make_state(4)
    with open_manager(tmp_path / "a", mirror=s3_url) as ckpt:
        with pytest.warns(SafepointWarning, match="skipping checkpoint .*step_00000001"):
            assert ckpt.restore(fresh) == 1
    assert_same(weights(fresh), weights(state))
    verify(tmp_path / "a" / "step_00000001")  # the local copy is whole again


# --------------------------------------------------------------------------- remote retention


def test_remote_retention_and_crash_safe_remote_delete(s3_url: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "a", mirror=s3_url, mirror_keep=[KeepEvery(4), KeepLast(2)]) as ckpt:
        ckpt.restore(state)
        for step in range(1, 8):
            train(state, step)
            ckpt.save(step, state)
            ckpt._mirror.wait(30)
    assert remote_steps(s3_url) == [4, 6, 7]
    assert local_steps(tmp_path / "a") == list(range(1, 8))  # local retention is its own (none here)
    meta = read_run_meta(tmp_path / "a")
    assert meta["mirrored"] == [4, 6, 7] and meta["mirror_skipped"] == [1, 2, 3, 5]
    assert {e["step"] for e in events(tmp_path / "a", "mirror_prune")} == {1, 2, 3, 5}
    assert unmirrored_steps(tmp_path / "a") == set()  # skipped ones are not held locally for the mirror

    # A crash between the two halves of a remote delete leaves uncommitted data only.
    store = Storage(s3_url)
    original = Storage.rm

    def rm(storage: Storage, key: str, *, recursive: bool = False) -> None:
        if recursive:
            raise RuntimeError("crash (injected) after the manifest was deleted")
        original(storage, key, recursive=recursive)

    monkeypatch.setattr(Storage, "rm", rm)
    with pytest.raises(RuntimeError):
        delete_remote_checkpoint(store, 6)
    monkeypatch.setattr(Storage, "rm", original)
    assert remote_steps(s3_url) == [4, 7] and store.find("step_00000006")
    # The next retention pass removes the leftovers.
    with open_manager(tmp_path / "a", mirror=s3_url, mirror_keep=[KeepLast(2)]) as ckpt:
        ckpt.restore(state)
        train(state, 8)
        ckpt.save(8, state)
        ckpt._mirror.wait(30)
    assert remote_steps(s3_url) == [7, 8] and store.find("step_00000006") == {}
    assert [e["step"] for e in events(tmp_path / "a", "mirror_gc")] == [6]


# --------------------------------------------------------------------------- push / pull by hand


def test_push_and_pull_by_hand_are_resumable_with_progress(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "run") as ckpt:  # no mirror configured
        ckpt.restore(state)
        for step in (1, 2, 3):
            train(state, step)
            ckpt.save(step, state)
    infos = list_checkpoints(tmp_path / "run")
    seen: list[Progress] = []
    report = push(tmp_path / "run", s3_url, progress=seen.append)
    assert report.ok and report.done == [1, 2, 3] and report.skipped == []
    plan = [p for p in seen if p.kind == "plan"]
    assert len(plan) == 1 and plan[0].nbytes == sum(c.size for c in infos)
    assert sum(p.nbytes for p in seen if p.kind == "bytes") == plan[0].nbytes  # every byte, once
    assert [p.step for p in seen if p.kind == "step_done"] == [1, 2, 3]

    seen.clear()
    again = push(tmp_path / "run", s3_url, progress=seen.append)
    assert again.skipped == [1, 2, 3] and again.done == [] and not [p for p in seen if p.kind == "bytes"]

    # An interrupted push: step 2 lost its manifest and one file. Only that file goes up again.
    store = Storage(s3_url)
    store.rm("step_00000002/manifest.json")
    store.rm("step_00000002/optimizer.safetensors")
    seen.clear()
    third = push(tmp_path / "run", s3_url, progress=seen.append)
    assert third.done == [2] and third.skipped == [1, 3]
    assert [p.name for p in seen if p.kind == "file"] == ["optimizer.safetensors"]
    assert {p.name for p in seen if p.kind == "skip" and p.step == 2} == {"model.safetensors", "_rng.safetensors",
                                                                          "state.json"} & set(
        json.loads((tmp_path / "run" / "step_00000002" / "manifest.json").read_text())["files"]) - {"optimizer.safetensors"}

    # Pull into a new directory, then again (nothing to do), then resume an interrupted one.
    seen.clear()
    got = pull(s3_url, tmp_path / "copy", progress=seen.append)
    assert got.done == [1, 2, 3] and got.ok
    for c in infos:
        assert (tmp_path / "copy" / c.path.name / "manifest.json").read_bytes() == (c.path / "manifest.json").read_bytes()
        verify(tmp_path / "copy" / c.path.name)
    assert pull(s3_url, tmp_path / "copy").skipped == [1, 2, 3]
    partial = tmp_path / "copy" / "step_00000003.tmp-0badc0de"
    shutil.move(tmp_path / "copy" / "step_00000003", partial)
    (partial / "manifest.json").unlink()
    (partial / "optimizer.safetensors").write_bytes(b"garbage")
    seen.clear()
    resumed = pull(s3_url, tmp_path / "copy", steps=[3], progress=seen.append)
    assert resumed.done == [3]
    assert [p.name for p in seen if p.kind == "file"] == ["optimizer.safetensors"]
    verify(tmp_path / "copy" / "step_00000003")
    assert not partial.exists()
    latest = pull(s3_url, tmp_path / "latest-only", latest=True)
    assert latest.done == [3] and local_steps(tmp_path / "latest-only") == [3]

    # The copy resumes like the original.
    fresh = make_state(2)
    with open_manager(tmp_path / "copy") as ckpt:
        assert ckpt.restore(fresh) == 3
    assert_same(weights(fresh), weights(state))


def test_pull_refuses_a_live_run_directory(s3_url: str, tmp_path: Path) -> None:
    with open_manager(tmp_path / "live"):
        with pytest.raises(DirectoryLocked):
            pull(s3_url, tmp_path / "live")


def test_push_refuses_damaged_local_checkpoint(s3_url: str, tmp_path: Path) -> None:
    state = make_state(0)
    with open_manager(tmp_path / "run") as ckpt:
        ckpt.restore(state)
        train(state, 1)
        ckpt.save(1, state)
    path = tmp_path / "run" / "step_00000001" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    report = push(tmp_path / "run", s3_url)
    assert list(report.failed) == [1] and "does not match its manifest" in report.failed[1]
    assert remote_steps(s3_url) == []


# --------------------------------------------------------------------------- start-up and configuration


def test_wrong_credentials_fail_at_start_naming_the_url(s3_server, s3_url: str, tmp_path: Path) -> None:
    with pytest.raises(MirrorError) as info:
        open_manager(tmp_path / "a", mirror=s3_url, mirror_options=s3_server.options(secret="nope"))
    assert s3_url in str(info.value) and "access denied" in str(info.value)
    with open_manager(tmp_path / "a"):  # the directory lock was released
        pass


def test_unreachable_mirror_fails_at_start(s3_server, s3_url: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = MirrorConfig(s3_url, options={"endpoint_url": f"http://127.0.0.1:{port}",
                                           "config_kwargs": {"retries": {"max_attempts": 1}}}, retry=FAST)
    with pytest.raises(MirrorError, match=rf"unreachable.*127\.0\.0\.1:{port}"):
        open_manager(tmp_path / "a", mirror=config)


def test_mirror_config_arguments() -> None:
    config = MirrorConfig.build("s3://b/p", keep=KeepLast(2), keep_local=1, close_timeout=None)
    assert config.keep == [KeepLast(2)] and config.keep_local == 1 and config.close_timeout is None
    with pytest.raises(ValueError, match="set options/keep"):
        MirrorConfig.build(config, keep=[KeepLast(1)])
    with pytest.raises(ValueError):
        MirrorConfig("s3://b/p", keep_local=0)
    with pytest.raises(ValueError):
        MirrorConfig("s3://b/p", verify="md5")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- retention rules (pure)


def _info(step: int, *, mirrored: bool = False, pinned: bool = False):
    from safepoint.catalog import CheckpointInfo

    return CheckpointInfo(step=step, path=Path(f"step_{step:08d}"), created="2024-01-01T00:00:00+00:00",
                          committed="2024-01-01T00:00:00+00:00", size=1, mirrored=mirrored, pinned=pinned)


def test_retention_protects_unmirrored_and_keep_local_evicts_only_mirrored() -> None:
    infos = [_info(1, mirrored=True), _info(2), _info(3, mirrored=True), _info(4, mirrored=True), _info(5)]
    assert protected_steps(infos, resumed_from=None) == {5}  # backward compatible
    assert protected_steps(infos, resumed_from=None, unmirrored={2, 5, 99}) == {2, 5}
    assert [d.step for d in plan_deletions(infos, [KeepLast(1)])] == [1, 2, 3, 4]
    assert [d.step for d in plan_deletions(infos, [KeepLast(1)], unmirrored={2, 5})] == [1, 3, 4]
    assert [b.step for b in budget_candidates(infos, [KeepLast(1)], unmirrored={2, 5})] == [1, 3, 4]
    # keep_local alone: mirrored ones outside the newest N go, unmirrored and newest stay.
    assert [d.step for d in plan_deletions(infos, [], unmirrored={2, 5}, keep_local=2)] == [1, 3]
    assert plan_deletions(infos, []) == []  # no policy and no keep_local: nothing is deleted
    assert [d.step for d in plan_deletions(infos, [KeepEvery(3)], unmirrored={2, 5}, keep_local=1)] == [1, 3, 4]
