"""Tests for restore: exact round trips, corruption fallback, never unpickling, bad input, the report."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from safepoint import (CheckpointManager, CheckpointNotFound, CorruptCheckpoint, IncompatibleState, KeepLast,
                       ResumableLoader, RunDirectoryError, SafepointWarning, UnsupportedFormat)
from conftest import reference_hash


def open_manager(path: Path, **kw: Any) -> CheckpointManager:
    kw.setdefault("signals", ())
    return CheckpointManager(path, **kw)


# --------------------------------------------------------------------------- a full training state

class Tracker:
    """A user object following the Stateful protocol, with a tensor and non-JSON-native values."""

    def __init__(self) -> None:
        self.count = 0
        self.total = torch.zeros(3, dtype=torch.float64)
        self.seen: tuple[int, ...] = ()
        self.best = float("inf")

    def update(self, x: torch.Tensor) -> None:
        self.count += 1
        self.total += x.double().sum(0)[:3]
        self.seen = self.seen + (self.count,)
        self.best = min(self.best, float(x.sum()))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total.clone(), "seen": self.seen, "best": self.best}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.count, self.total, self.seen, self.best = sd["count"], sd["total"].clone(), sd["seen"], sd["best"]


DATA = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 4) / 100


def build(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    loader = ResumableLoader(DATA, batch_size=3, seed=7)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "loader": loader,
            "meta": {"epoch": 0, "history": [], "best": (float("nan"), -1), 3: "int key"},
            "tracker": Tracker()}


def train(state: dict[str, Any], steps: int) -> None:
    model, opt = state["model"], state["optimizer"]
    it = state.setdefault("_it", None)
    for _ in range(steps):
        if it is None:
            it = state["loader"].iter_forever()
        x = next(it)
        noise = torch.randn(x.shape[0], 2) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = ((model(x) - noise) ** 2).mean()
        opt.zero_grad()
        state["scaler"].scale(loss).backward()
        state["scaler"].step(opt)
        state["scaler"].update()
        state["scheduler"].step()
        state["meta"]["epoch"] = state["loader"].epoch
        state["meta"]["history"].append(loss.item())
        state["tracker"].update(x)
    state["_it"] = it


def entries(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith("_")}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in entries(state).items():
        out[k] = copy.deepcopy(v if isinstance(v, dict) else v.state_dict())
    out["_rng"] = (random.getstate(), np.random.get_state(), torch.get_rng_state().clone())
    return out


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                           b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8)), f"{where}: bits differ"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__}/{len(a)} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_exact_round_trip(tmp_path: Path) -> None:
    run = tmp_path / "run"
    original = build(seed=0)
    train(original, 5)
    with open_manager(run) as mgr:
        mgr.save(5, entries(original))
    at_save = snapshot(original)
    expected_draws = draws()
    train(original, 4)  # move everything on, then come back
    assert original["tracker"].count == 9

    fresh = build(seed=1)
    meta_obj = fresh["meta"]
    with open_manager(run) as mgr:
        assert mgr.restore(entries(fresh)) == 5
        report = mgr.restore_report
    assert fresh["meta"] is meta_obj  # a plain dict is updated in place
    restored = snapshot(fresh)
    for name in ("model", "optimizer", "scheduler", "scaler", "loader", "meta", "tracker"):
        assert_same(at_save[name], restored[name], name)
    assert fresh["scheduler"].last_epoch == at_save["scheduler"]["last_epoch"] == 5
    assert fresh["optimizer"].param_groups[0]["lr"] == at_save["optimizer"]["param_groups"][0]["lr"]
    assert fresh["optimizer"].param_groups[0]["lr"] != original["optimizer"].param_groups[0]["lr"]
    assert fresh["scaler"].get_scale() == at_save["scaler"]["scale"]
    assert isinstance(fresh["meta"]["best"], tuple) and 3 in fresh["meta"]
    # every RNG stream is where it was at save time: same next numbers
    assert random.getstate() == at_save["_rng"][0]
    assert torch.equal(torch.get_rng_state(), at_save["_rng"][2])
    assert draws() == expected_draws
    assert report.rng == ["python", "numpy", "torch"]


def test_resumed_training_is_identical(tmp_path: Path) -> None:
    """Train 3, save, train 4 more  ==  restore into fresh objects, train 4."""
    run = tmp_path / "run"
    a = build(seed=0)
    train(a, 3)
    with open_manager(run) as mgr:
        mgr.save(3, entries(a))
    train(a, 4)
    a_after = snapshot(a)
    a_draws = draws()

    b = build(seed=123)
    train(b, 2)  # b has its own history before the restore
    with open_manager(run) as mgr:
        assert mgr.restore(entries(b)) == 3
    b["_it"] = None  # a new iterator starts at the restored position
    train(b, 4)
    b_after = snapshot(b)
    for name in ("model", "optimizer", "scheduler", "scaler", "loader", "meta", "tracker"):
        assert_same(a_after[name], b_after[name], name)
    assert draws() == a_draws


# --------------------------------------------------------------------------- corruption

def simple_state(value: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return {"model": model, "optimizer": opt, "meta": {"value": value}}


@pytest.fixture
def two_steps(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, simple_state(1.0))
        mgr.save(2, simple_state(2.0))
    return run


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_manifest(path: Path, **fields: Any) -> None:
    m = json.loads(path.read_text())
    m.update(fields)
    path.write_text(json.dumps(m))


CORRUPTIONS = {
    "flipped_model_byte": (lambda ck: flip_byte(ck / "model.safetensors"), CorruptCheckpoint,
                           r"model\.safetensors.*(hash|sha256)"),
    "flipped_state_json": (lambda ck: flip_byte(ck / "state.json", 5), CorruptCheckpoint, r"state\.json"),
    "truncated_optimizer": (lambda ck: truncate(ck / "optimizer.safetensors"), CorruptCheckpoint,
                            r"optimizer\.safetensors.*bytes"),
    "missing_file": (lambda ck: (ck / "optimizer.safetensors").unlink(), CorruptCheckpoint,
                     r"optimizer\.safetensors.*missing"),
    "missing_state_json": (lambda ck: (ck / "state.json").unlink(), CorruptCheckpoint, r"state\.json.*missing"),
    "missing_manifest": (lambda ck: (ck / "manifest.json").unlink(), CorruptCheckpoint,
                         r"manifest\.json.*missing"),
    "garbled_manifest": (lambda ck: (ck / "manifest.json").write_bytes(b'{"format": "safepoint.chec'),
                         CorruptCheckpoint, r"manifest\.json.*JSON"),
    "empty_manifest": (lambda ck: (ck / "manifest.json").write_bytes(b""), CorruptCheckpoint, r"manifest\.json"),
    "manifest_not_ours": (lambda ck: (ck / "manifest.json").write_text('{"hello": 1}'), CorruptCheckpoint,
                          r"not a safepoint manifest"),
    "manifest_wrong_step": (lambda ck: set_manifest(ck / "manifest.json", step=7), CorruptCheckpoint,
                            r"step 7"),
    "manifest_missing_field": (lambda ck: set_manifest(ck / "manifest.json", files=None), CorruptCheckpoint,
                               r"malformed"),
    "unknown_format_version": (lambda ck: set_manifest(ck / "manifest.json", format_version=99), UnsupportedFormat,
                               r"format version 99"),
    "extra_byte_appended": (lambda ck: (ck / "model.safetensors").open("ab").write(b"\0"), CorruptCheckpoint,
                            r"model\.safetensors"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_falls_back(kind: str, two_steps: Path) -> None:
    corrupt, _, reason = CORRUPTIONS[kind]
    ck = two_steps / "step_00000002"
    corrupt(ck)
    state = simple_state(9.0)
    with open_manager(two_steps) as mgr:
        with pytest.warns(SafepointWarning) as caught:
            assert mgr.restore(state) == 1
        report = mgr.restore_report
    msgs = [str(w.message) for w in caught if issubclass(w.category, SafepointWarning)]
    assert any(str(ck) in m for m in msgs), msgs
    assert any(re.search(reason, m) for m in msgs), (reason, msgs)
    assert all(p.item() == 1.0 for t in state["model"].state_dict().values() for p in t.reshape(-1))
    assert state["meta"] == {"value": 1.0}
    assert report.step == 1 and report.path.name == "step_00000001"
    assert len(report.skipped) == 1 and report.skipped[0].startswith("step_00000002")
    events = [json.loads(line) for line in (two_steps / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "skip_corrupt" and e["checkpoint"] == "step_00000002" for e in events)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_explicit_step_raises(kind: str, two_steps: Path) -> None:
    corrupt, error, reason = CORRUPTIONS[kind]
    corrupt(two_steps / "step_00000002")
    state = simple_state(9.0)
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with open_manager(two_steps) as mgr:
        with pytest.raises(error, match=reason):
            mgr.restore(state, step=2)
        for k, v in state["model"].state_dict().items():
            assert torch.equal(v, before[k])
        assert state["meta"] == {"value": 9.0}
        assert mgr.restore(state, step=1) == 1  # the good one still loads


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_hash_mismatch_names_file_and_both_hashes(name: str, two_steps: Path) -> None:
    ck = two_steps / "step_00000002"
    expected = json.loads((ck / "manifest.json").read_text())["files"][name]["hash"]
    flip_byte(ck / name, len((ck / name).read_bytes()) // 2)
    actual = reference_hash((ck / name).read_bytes(), expected)
    assert expected != actual
    with open_manager(two_steps) as mgr:
        with pytest.raises(CorruptCheckpoint) as info:
            mgr.restore(simple_state(9.0), step=2)
    msg = str(info.value)
    assert str(ck / name) in msg
    assert expected in msg and actual in msg
    assert msg.index(expected) < msg.index(actual)  # "expected ..., got ..."


def test_all_corrupt_returns_zero(two_steps: Path) -> None:
    flip_byte(two_steps / "step_00000001" / "model.safetensors")
    (two_steps / "step_00000002" / "manifest.json").unlink()
    state = simple_state(9.0)
    with open_manager(two_steps) as mgr:
        with pytest.warns(SafepointWarning):
            assert mgr.restore(state) == 0
        assert [s.split(" ")[0] for s in mgr.restore_report.skipped] == ["step_00000002", "step_00000001"]
        assert mgr.restore_report.path is None
    assert state["meta"] == {"value": 9.0}
    assert all(v.item() == 9.0 for t in state["model"].state_dict().values() for v in t.reshape(-1))


def test_corrupt_middle_checkpoint_does_not_hide_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        for i in (1, 2, 3):
            mgr.save(i, simple_state(float(i)))
    flip_byte(run / "step_00000002" / "model.safetensors")
    with open_manager(run) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SafepointWarning)
            assert mgr.restore(simple_state(0.0)) == 3
        assert mgr.restore_report.skipped == []


def test_missing_step_raises_not_found(two_steps: Path) -> None:
    with open_manager(two_steps) as mgr:
        with pytest.raises(CheckpointNotFound, match=r"step 5.*1, 2"):
            mgr.restore(simple_state(0.0), step=5)
        with pytest.raises(FileNotFoundError):
            mgr.restore(simple_state(0.0), step=3)


def test_restore_with_no_checkpoint_returns_zero(tmp_path: Path) -> None:
    state = simple_state(4.0)
    with open_manager(tmp_path / "run") as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SafepointWarning)
            assert mgr.restore(state) == 0
        report = mgr.restore_report
        assert report.step == 0 and report.path is None and report.skipped == []
        assert "no committed checkpoint" in report.summary()
        mgr.save(1, state)  # a fresh run may save after an empty restore
        assert [c.step for c in mgr.list()] == [1]
    assert state["meta"] == {"value": 4.0}


# --------------------------------------------------------------------------- never unpickle

class Evil:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def rewrite_manifest(ck: Path) -> None:
    """Recompute the manifest from the files now present, as a forger would, so verification passes."""
    m = json.loads((ck / "manifest.json").read_text())
    files = {}
    for p in sorted(ck.iterdir()):
        if p.name != "manifest.json":
            data = p.read_bytes()
            files[p.name] = {"size": len(data), "hash": hashlib.sha256(data).hexdigest()}
    m["files"] = files
    (ck / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("safepoint called an unpickler")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    yield


def test_evil_payload_is_live(tmp_path: Path) -> None:
    """The payload used below really runs code when unpickled (so the tests can fail)."""
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Evil(canary)))
    assert canary.exists()
    canary2 = tmp_path / "canary2"
    torch.save(Evil(canary2), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert canary2.exists()


def _restore_outcome(run: Path, state: dict[str, Any]) -> tuple[int | None, BaseException | None, list[str]]:
    with open_manager(run) as mgr:
        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                step = mgr.restore(state)
            return step, None, mgr.restore_report.skipped
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - failing with an error is an accepted outcome
            return None, err, []


@pytest.mark.parametrize("how", ["raw_pickle", "torch_save"])
def test_pickle_as_tensor_file_is_never_executed(how: str, two_steps: Path, tmp_path: Path,
                                                 no_unpickling: None) -> None:
    marker = tmp_path / f"pwned-{how}"
    ck = two_steps / "step_00000002"
    target = ck / "model.safetensors"
    target.unlink()
    if how == "raw_pickle":
        target.write_bytes(pickle.dumps(Evil(marker)))
    else:
        torch.save(Evil(marker), target)
    rewrite_manifest(ck)
    state = simple_state(9.0)
    step, err, skipped = _restore_outcome(two_steps, state)
    assert not marker.exists()
    if err is None:  # skipped it and fell back
        assert step == 1 and skipped and skipped[0].startswith("step_00000002")
        assert state["meta"] == {"value": 1.0}
    else:
        assert state["meta"] == {"value": 9.0}
    with open_manager(two_steps) as mgr:  # an explicit request for it is an error
        with pytest.raises(Exception) as info:
            mgr.restore(simple_state(9.0), step=2)
        assert not isinstance(info.value, AssertionError)
    assert not marker.exists()


def test_pt_files_in_a_checkpoint_are_never_loaded(two_steps: Path, tmp_path: Path, no_unpickling: None) -> None:
    marker = tmp_path / "pwned-pt"
    ck = two_steps / "step_00000002"
    torch.save(Evil(marker), ck / "model.pt")
    (ck / "extra.pkl").write_bytes(pickle.dumps(Evil(marker)))
    rewrite_manifest(ck)
    state = simple_state(9.0)
    with open_manager(two_steps) as mgr:
        assert mgr.restore(state) == 2
    assert not marker.exists()
    assert state["meta"] == {"value": 2.0}
    # model.safetensors replaced by a model.pt: the tensors are gone, so the checkpoint is refused
    (ck / "model.safetensors").unlink()
    rewrite_manifest(ck)
    state = simple_state(9.0)
    step, err, skipped = _restore_outcome(two_steps, state)
    assert not marker.exists()
    assert err is not None or (step == 1 and skipped)


def test_pickle_inside_state_json_is_never_executed(two_steps: Path, tmp_path: Path, no_unpickling: None) -> None:
    marker = tmp_path / "pwned-json"
    payload = pickle.dumps(Evil(marker))
    b64 = base64.b64encode(payload).decode()
    ck = two_steps / "step_00000002"
    doc = json.loads((ck / "state.json").read_text())
    doc["entries"]["meta"] = {
        "as_bytes": {"__bytes__": b64},
        "as_unknown_tag": {"__pickle__": b64},
        "as_reduce": {"py/reduce": [{"py/function": "builtins.open"}, [str(marker), "w"]]},
        "as_string": payload.decode("latin-1"),
    }
    (ck / "state.json").write_text(json.dumps(doc))
    rewrite_manifest(ck)
    state = simple_state(9.0)
    with open_manager(two_steps) as mgr:
        assert mgr.restore(state) == 2
    assert not marker.exists()
    meta = state["meta"]
    assert meta["as_bytes"] == payload and isinstance(meta["as_bytes"], bytes)
    assert meta["as_unknown_tag"] == {"__pickle__": b64}
    assert meta["as_string"] == payload.decode("latin-1")


def test_object_numpy_in_state_json_is_never_unpickled(two_steps: Path, tmp_path: Path,
                                                       no_unpickling: None) -> None:
    marker = tmp_path / "pwned-numpy"
    ck = two_steps / "step_00000002"
    doc = json.loads((ck / "state.json").read_text())
    doc["entries"]["meta"] = {"arr": {"__numpy__": {"dtype": "|O", "shape": [1], "scalar": False,
                                                    "data": base64.b64encode(pickle.dumps(Evil(marker))).decode()}}}
    (ck / "state.json").write_text(json.dumps(doc))
    rewrite_manifest(ck)
    step, err, skipped = _restore_outcome(two_steps, simple_state(9.0))
    assert not marker.exists()
    assert err is not None or (step == 1 and skipped)


# --------------------------------------------------------------------------- incompatible state

def test_wrong_shapes_raise_and_change_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    with open_manager(run) as mgr:
        mgr.save(1, {"model": nn.Linear(4, 3), "meta": {"a": 1}})
    other = nn.Linear(4, 5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    meta = {"a": 2}
    rng_before = torch.get_rng_state().clone()
    torch.rand(1)  # the restore must not rewind the RNG either
    rng_mid = torch.get_rng_state().clone()
    with open_manager(run) as mgr:
        with pytest.raises(IncompatibleState) as info:
            mgr.restore({"meta": meta, "model": other})
    msg = str(info.value)
    assert "'model'" in msg and "weight" in msg and "bias" in msg
    assert "(3, 4)" in msg and "(5, 4)" in msg
    assert "(3,)" in msg and "(5,)" in msg
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert meta == {"a": 2}
    assert torch.equal(torch.get_rng_state(), rng_mid) and not torch.equal(rng_mid, rng_before)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, {"model": nn.Sequential(nn.Linear(4, 3))})
    bigger = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with open_manager(run) as mgr:
        with pytest.raises(IncompatibleState) as info:
            mgr.restore({"model": bigger})
    msg = str(info.value)
    assert "1.weight" in msg and "1.bias" in msg and "lacks" in msg

    renamed = nn.Sequential(nn.Identity(), nn.Linear(4, 3))
    before = {k: v.clone() for k, v in renamed.state_dict().items()}
    with open_manager(run) as mgr:
        with pytest.raises(IncompatibleState) as info:
            mgr.restore({"model": renamed})
    msg = str(info.value)
    assert "0.weight" in msg and "1.weight" in msg  # unexpected and missing both named
    for k, v in renamed.state_dict().items():
        assert torch.equal(v, before[k])


def test_optimizer_with_different_param_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = simple_state(1.0)
    with open_manager(run) as mgr:
        mgr.save(1, state)
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([model.weight], lr=0.1)
    with open_manager(run) as mgr:
        with pytest.raises(IncompatibleState, match=r"'optimizer'.*\[2\].*\[1\]"):
            mgr.restore({"model": model, "optimizer": opt})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the model was loaded although the optimizer did not fit"
    assert opt.state_dict()["state"] == {}


def test_incompatible_is_not_silently_skipped(tmp_path: Path) -> None:
    """A shape mismatch is the user's error, not corruption: no fallback to an older checkpoint."""
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, {"model": nn.Linear(4, 5)})
        mgr.save(2, {"model": nn.Linear(4, 5)})
    with open_manager(run) as mgr:
        with pytest.raises(IncompatibleState):
            mgr.restore({"model": nn.Linear(4, 3)})


# --------------------------------------------------------------------------- bad input

def test_entry_without_state_dict(tmp_path: Path) -> None:
    with open_manager(tmp_path / "run") as mgr:
        with pytest.raises(TypeError, match=r"state\['thing'\].*int.*state_dict"):
            mgr.save(1, {"model": nn.Linear(2, 2), "thing": 42})
        with pytest.raises(TypeError, match=r"state\['thing'\]"):
            mgr.restore({"thing": [1, 2]})
        with pytest.raises(TypeError, match=r"state\['half'\].*load_state_dict"):
            mgr.save(1, {"half": type("Half", (), {"state_dict": lambda self: {}})()})
        assert mgr.list() == []


@pytest.mark.parametrize("name", ["bad/name", "../escape", "", "_rng", "_private", ".hidden", "a" * 101,
                                  "sp ace", 3, None])
def test_invalid_entry_name(name: Any, tmp_path: Path) -> None:
    with open_manager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match="entry name"):
            mgr.save(1, {name: {}})
        with pytest.raises(ValueError, match="entry name"):
            mgr.restore({name: {}})
        assert mgr.list() == []
    assert not any(p.name.startswith("step_") for p in (tmp_path / "run").iterdir())


@pytest.mark.parametrize("name", ["model", "a", "A-1", "x.y_z", "0", "a" * 100])
def test_valid_entry_names(name: str, tmp_path: Path) -> None:
    with open_manager(tmp_path / "run") as mgr:
        mgr.save(1, {name: {"v": 1}})
        d: dict = {}
        assert mgr.restore({name: d}) == 1
        assert d == {"v": 1}


def test_state_must_be_a_mapping(tmp_path: Path) -> None:
    with open_manager(tmp_path / "run") as mgr:
        with pytest.raises(TypeError, match="state must be a dict"):
            mgr.save(1, [nn.Linear(2, 2)])  # type: ignore[arg-type]


def test_run_directory_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "run"
    f.write_text("not a dir")
    with pytest.raises(RunDirectoryError, match="is a file"):
        open_manager(f)
    with pytest.raises(OSError):
        open_manager(f)
    assert f.read_text() == "not a dir"


def test_foreign_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, simple_state(1.0))
        mgr.save(2, simple_state(2.0))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("step_*/*")}
    with open_manager(run, keep=KeepLast(1)) as mgr:
        with pytest.raises(RunDirectoryError, match=r"restore"):
            mgr.save(1, simple_state(5.0))
        with pytest.raises(RunDirectoryError):
            mgr.save(10, simple_state(5.0))
        assert [c.step for c in mgr.list()] == [1, 2]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("step_*/*")}
    assert after == before


# --------------------------------------------------------------------------- the report

def test_restore_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = build(seed=0)
    train(saved, 2)
    with open_manager(run) as mgr:
        mgr.save(2, {k: saved[k] for k in ("model", "optimizer", "loader", "meta")})
    state = build(seed=1)
    partial = {"model": state["model"], "loader": state["loader"], "added_later": {"x": 1}}
    with open_manager(run) as mgr:
        with pytest.warns(SafepointWarning, match="added_later"):
            assert mgr.restore(partial) == 2
        report = mgr.restore_report
    assert report.step == 2 and report.path == run / "step_00000002"
    assert report.restored == ["model", "loader"]
    assert report.not_in_checkpoint == ["added_later"]
    assert sorted(report.not_in_state) == ["meta", "optimizer"]
    assert report.rng == ["python", "numpy", "torch"]
    assert "loader" in report.data_position and "restored" in report.data_position
    assert report.skipped == []
    assert partial["added_later"] == {"x": 1}
    summary = report.summary()
    for word in ("step 2", "model", "loader", "added_later", "optimizer"):
        assert word in summary
    assert state["loader"].state_dict() == saved["loader"].state_dict()


def test_report_without_data_position(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, simple_state(1.0))
    with open_manager(run) as mgr:
        mgr.restore(simple_state(0.0))
        report = mgr.restore_report
    assert "not in state" in report.data_position and "ResumableLoader" in report.data_position
    assert report.restored == ["model", "optimizer", "meta"]
    assert report.not_in_checkpoint == [] and report.not_in_state == []
