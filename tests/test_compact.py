"""Smaller checkpoints: zstd compression and XOR deltas restore bit for bit, a delta's base is never
deleted while the delta exists, damage is refused, and 8-bit moments shrink the optimizer and resume."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROOT, train_env
from safepoint import CheckpointManager, CorruptCheckpoint, KeepLast, SafepointWarning
from safepoint.catalog import CheckpointInfo, list_checkpoints, verify
from safepoint.cli import app
from safepoint.dashboard import actions
from safepoint.diff import diff_checkpoints
from safepoint.export import export
from safepoint.manifest import read_manifest
from safepoint.mirror import pull, push
from safepoint.quantize import BLOCK, dequantize, quantize_moments
from safepoint.retention import budget_candidates, plan_deletions, protected_steps
from safepoint.rundir import open_run

VOCAB, WIDTH = 64, 64  # big enough that Adam moments of the layers reach quantize.MIN_NUMEL


def tiny_transformer(seed: int = 0) -> torch.nn.Module:
    """Embedding (frozen, so deltas see an unchanged tensor), two encoder layers, a head."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, WIDTH), torch.nn.TransformerEncoder(layer, 2),
                                torch.nn.Linear(WIDTH, VOCAB))
    model[0].weight.requires_grad_(False)
    return model


def new_state(seed: int = 0) -> dict[str, Any]:
    model = tiny_transformer(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    return {"model": model, "optimizer": opt}


def train(state: dict[str, Any], steps: int, seed: int) -> list[float]:
    model, opt = state["model"], state["optimizer"]
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (8, 12), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), x.roll(1, dims=1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for i, s in state["optimizer"].state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    return out


def assert_bitwise(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if got[k].dtype != expected[k].dtype or got[k].shape != expected[k].shape
              or not torch.equal(got[k].reshape(-1).view(torch.uint8), expected[k].reshape(-1).view(torch.uint8))]
    assert not differ, f"not bitwise equal: {differ}"


def restored(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    state = new_state(seed=99)  # different weights: a restore that misses a byte shows
    train(state, 1, seed=99)  # so the optimizer has state to overwrite
    with CheckpointManager(run) as ckpt:
        ckpt.restore(state, step=step)
    return snapshot(state)


def run_saves(run: Path, steps: int, **options: Any) -> dict[int, dict[str, torch.Tensor]]:
    """Train and save ``steps`` times; the exact state at every save."""
    state = new_state()
    saved = {}
    with CheckpointManager(run, **options) as ckpt:
        ckpt.restore(state)
        for step in range(1, steps + 1):
            train(state, 2, seed=step)
            ckpt.save(step, state)
            saved[step] = snapshot(state)
    return saved


def parents(run: Path) -> dict[int, int | None]:
    return {c.step: c.parent for c in list_checkpoints(run)}


def assert_no_orphan(run: Path) -> None:
    """Every committed delta's base is committed and holds what the delta was encoded against."""
    for info in list_checkpoints(run):
        verify(info.path)  # checks the base too


# ------------------------------------------------------------------------------ lossless


def test_plain_checkpoints_are_unchanged_by_default(tmp_path: Path) -> None:
    run_saves(tmp_path, 1)
    m = read_manifest(tmp_path / "step_00000001")
    assert m.format_version == 1 and m.extra == {} and m.parent is None
    assert sorted(m.files) == ["_rng.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]


def test_compressed_restore_is_bitwise_exact_and_training_continues_alike(tmp_path: Path) -> None:
    original = new_state()
    with CheckpointManager(tmp_path, compress="zstd") as ckpt:
        ckpt.restore(original)
        train(original, 4, seed=1)
        ckpt.save(4, original)
    m = read_manifest(tmp_path / "step_00000004")
    assert m.format_version == 2 and m.parent is None
    assert {"model.safetensors.zst", "optimizer.safetensors.zst"} <= set(m.files)
    assert not any(n.endswith(".safetensors") for n in m.files)
    raw = m.extra["encoding"]["optimizer.safetensors.zst"]["raw_size"]
    assert m.files["optimizer.safetensors.zst"].size < raw  # it did compress
    assert_bitwise(restored(tmp_path), snapshot(original))

    resumed = new_state(seed=5)
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.restore(resumed) == 4
    assert train(resumed, 3, seed=7) == train(original, 3, seed=7)
    assert_bitwise(snapshot(resumed), snapshot(original))


def test_delta_chain_restores_every_step_bitwise(tmp_path: Path) -> None:
    saved = run_saves(tmp_path, 7, delta_every=3)
    assert parents(tmp_path) == {1: None, 2: 1, 3: 1, 4: None, 5: 4, 6: 4, 7: None}
    base, delta = read_manifest(tmp_path / "step_00000004"), read_manifest(tmp_path / "step_00000005")
    assert "model.safetensors" in base.files  # bases stay plain without compress=
    assert delta.files["model.safetensors.xor.zst"].size < 0.85 * base.files["model.safetensors"].size
    assert delta.extra["encoding"]["model.safetensors.xor.zst"]["xor_with"] == {
        "step": 4, "file": "model.safetensors", "hash": base.files["model.safetensors"].hash}
    for step in saved:
        assert_bitwise(restored(tmp_path, step), saved[step])


def test_compressed_bases_and_deltas_together(tmp_path: Path) -> None:
    saved = run_saves(tmp_path, 3, compress="zstd", delta_every=3)
    assert parents(tmp_path) == {1: None, 2: 1, 3: 1}
    assert "model.safetensors.zst" in read_manifest(tmp_path / "step_00000001").files
    assert_bitwise(restored(tmp_path, 3), saved[3])


def test_async_saves_write_the_same_deltas(tmp_path: Path) -> None:
    state = new_state()
    saved = {}
    with CheckpointManager(tmp_path, every_steps=1, compress="zstd", delta_every=3, async_save=True) as ckpt:
        ckpt.restore(state)
        for step in range(1, 5):
            train(state, 1, seed=step)
            ckpt.step(step, state)  # returns once staged; training goes on while it is written
            saved[step] = snapshot(state)
    assert parents(tmp_path) == {1: None, 2: 1, 3: 1, 4: None}
    for step in (2, 3):
        assert_bitwise(restored(tmp_path, step), saved[step])


def test_a_reshaped_or_new_tensor_is_stored_in_full_in_a_delta(tmp_path: Path) -> None:
    same = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))  # 1 MiB zstd cannot shrink alone
    grow = {"w": torch.arange(12.0).reshape(3, 4), "same": same}
    with CheckpointManager(tmp_path, delta_every=4) as ckpt:
        ckpt.restore({"t": Holder(grow)})
        ckpt.save(1, {"t": Holder(grow)})
        grown = {"w": torch.arange(20.0).reshape(4, 5), "same": same, "new": torch.zeros(3, dtype=torch.int64)}
        ckpt.save(2, {"t": Holder(grown)})
    m = read_manifest(tmp_path / "step_00000002")
    assert m.parent == 1 and m.files["t.safetensors.xor.zst"].size < same.numel() * 4 / 100  # unchanged: ~free
    back = Holder({})
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore({"t": back}, step=2)
    assert_bitwise(back.tensors, grown)


class Holder:
    """A stateful entry with arbitrary tensors (shapes may change between saves)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------ retention of bases


def infos(spec: dict[int, int | None], *, pinned: tuple[int, ...] = (), mirrored: tuple[int, ...] = ()) -> list[CheckpointInfo]:
    return [CheckpointInfo(step=s, path=Path(f"/run/step_{s:08d}"), created="2026-01-01T00:00:00+00:00",
                           committed="2026-01-01T00:00:00+00:00", size=100, parent=p, pinned=s in pinned,
                           mirrored=s in mirrored) for s, p in spec.items()]


GROUPS = {10: None, 12: 10, 14: 10, 16: None, 18: 16}


@pytest.mark.parametrize("spec, keep, pinned, expected", [
    # the newest delta keeps its base; deltas are deleted before their base
    (GROUPS, [KeepLast(1)], (), [12, 14, 10]),
    (GROUPS, [KeepLast(2)], (), [12, 14, 10]),
    (GROUPS, [KeepLast(3)], (), [12]),
    # a pinned delta keeps its base, and only the base
    (GROUPS, [KeepLast(1)], (14,), [12]),
    # a base older than a delta after a rollback (delta 8 against base 10) is still deleted after it
    ({8: 10, 10: None, 12: None}, [KeepLast(1)], (), [8, 10]),
    ({8: 10, 10: None, 12: None}, [KeepLast(1)], (8,), []),
    # a delta whose base is already gone is deleted like any checkpoint
    ({12: 10, 14: None}, [KeepLast(1)], (), [12]),
])
def test_plan_deletions_keeps_every_needed_base(spec, keep, pinned, expected) -> None:
    assert [d.step for d in plan_deletions(infos(spec, pinned=pinned), keep)] == expected


def test_protected_and_budget_candidates_respect_bases() -> None:
    checkpoints = infos(GROUPS)
    assert protected_steps(checkpoints, resumed_from=14) == {10, 14, 16, 18}
    assert [c.step for c in budget_candidates(checkpoints, [])] == [12, 14, 10]
    assert [c.step for c in budget_candidates(checkpoints, [], resumed_from=12)] == [14]
    # unmirrored deltas keep their bases too
    assert protected_steps(checkpoints, resumed_from=None, unmirrored=[12]) == {10, 12, 16, 18}


def test_mirror_keep_local_never_drops_a_base_a_local_delta_needs() -> None:
    checkpoints = infos(GROUPS, mirrored=tuple(GROUPS))
    plan = plan_deletions(checkpoints, [], keep_local=2)  # keeps 16 and 18 (the newest two)
    assert [d.step for d in plan] == [12, 14, 10]
    plan = plan_deletions(infos({10: None, 12: 10, 14: 10}, mirrored=(10, 12, 14)), [], keep_local=1)
    assert [d.step for d in plan] == [12]  # 14 stays, so 10 stays


def test_real_run_with_retention_and_a_budget_never_orphans_a_delta(tmp_path: Path) -> None:
    state = new_state()
    with CheckpointManager(tmp_path / "keep", keep=[KeepLast(2)], delta_every=3) as ckpt:
        ckpt.restore(state)
        for step in range(1, 9):
            train(state, 1, seed=step)
            ckpt.save(step, state)
            assert_no_orphan(tmp_path / "keep")
        expected = snapshot(state)
    assert parents(tmp_path / "keep") == {7: None, 8: 7}
    assert_bitwise(restored(tmp_path / "keep"), expected)

    # A budget that holds about three full checkpoints: the budget deletes, never a needed base.
    full = sum(f.stat().st_size for f in (tmp_path / "keep" / "step_00000007").iterdir())
    state = new_state()
    with CheckpointManager(tmp_path / "budget", max_disk=int(3.5 * full), delta_every=4) as ckpt:
        ckpt.restore(state)
        for step in range(1, 10):
            train(state, 1, seed=step)
            ckpt.save(step, state)
            assert_no_orphan(tmp_path / "budget")
        expected = snapshot(state)
    assert len(list_checkpoints(tmp_path / "budget")) < 9  # the budget did delete
    assert_bitwise(restored(tmp_path / "budget"), expected)


def test_cli_prune_gc_and_dashboard_delete_protect_a_base(tmp_path: Path) -> None:
    run_saves(tmp_path, 5, delta_every=5)  # 1 full, 2..5 deltas of 1
    with pytest.raises(actions.Refused, match="base of delta 2"):  # even while only unprotected deltas need it
        actions.delete(open_run(tmp_path), 1, confirm=1)
    assert actions.delete(open_run(tmp_path), 3, confirm=3) == "deleted step 3"  # a delta may go
    cli = CliRunner()
    result = cli.invoke(app, ["prune", str(tmp_path), "--keep-last", "1", "--yes"])
    assert result.exit_code == 0, result.output
    assert parents(tmp_path) == {1: None, 5: 1}
    assert_no_orphan(tmp_path)
    result = cli.invoke(app, ["prune", str(tmp_path), "--max-disk", "1KB", "--yes"])
    assert result.exit_code != 0 and "base of delta 5" in result.output
    assert cli.invoke(app, ["gc", str(tmp_path)]).exit_code == 0
    with pytest.raises(actions.Refused, match="base of delta 5"):
        actions.delete(open_run(tmp_path), 1, confirm=1)
    assert parents(tmp_path) == {1: None, 5: 1}
    assert "delta(of 1)" in cli.invoke(app, ["ls", str(tmp_path)]).output


# ------------------------------------------------------------------------------ damage


def flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_delta_or_base_is_refused_and_restore_falls_back(tmp_path: Path) -> None:
    saved = run_saves(tmp_path, 4, delta_every=2, compress="zstd")  # 1 full, 2 delta, 3 full, 4 delta
    assert parents(tmp_path) == {1: None, 2: 1, 3: None, 4: 3}
    flip_byte(tmp_path / "step_00000004" / "model.safetensors.xor.zst")
    with pytest.raises(CorruptCheckpoint, match="model.safetensors.xor.zst"):
        restored(tmp_path, 4)
    flip_byte(tmp_path / "step_00000003" / "optimizer.safetensors.zst")
    with pytest.raises(CorruptCheckpoint, match="step_00000003"):
        restored(tmp_path, 3)
    with pytest.warns(SafepointWarning) as caught:
        assert_bitwise(restored(tmp_path), saved[2])  # 4 and 3 refused; the delta 2 (of 1) is exact
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "step_00000004" in messages[0] and "step_00000003" in messages[1]
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "steps 3, 4" in result.output


def test_a_missing_or_replaced_base_is_named(tmp_path: Path) -> None:
    run_saves(tmp_path, 2, delta_every=3)
    state = new_state(seed=3)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state, step=1)
        train(state, 1, seed=3)
        ckpt.save(1, state)  # step 1 saved again, other weights (a rollback, say): its old deltas lose their base
    with pytest.raises(CorruptCheckpoint, match="saved again"):
        restored(tmp_path, 2)
    shutil.rmtree(tmp_path / "step_00000001")
    with pytest.raises(CorruptCheckpoint, match="delta against step 1, whose checkpoint is missing"):
        verify(tmp_path / "step_00000002")


def test_a_damaged_base_makes_the_next_save_full(tmp_path: Path) -> None:
    state = new_state()
    with CheckpointManager(tmp_path, delta_every=4) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, state)
        flip_byte(tmp_path / "step_00000001" / "model.safetensors", 200)
        train(state, 1, seed=1)
        with pytest.warns(SafepointWarning, match="full files instead of a delta"):
            ckpt.save(2, state)
        expected = snapshot(state)
    assert read_manifest(tmp_path / "step_00000002").parent is None
    assert_bitwise(restored(tmp_path, 2), expected)


# ------------------------------------------------------------------------------ tools


def test_export_diff_and_show_read_encoded_checkpoints(tmp_path: Path) -> None:
    saved = run_saves(tmp_path, 2, delta_every=2, quantize_optimizer=True)
    files = export(tmp_path / "step_00000002", tmp_path / "out")
    weights = load_file(files[0])
    assert_bitwise({f"model.{k}": v for k, v in weights.items()},
                   {k: v for k, v in saved[2].items() if k.startswith("model.")})
    changes = {c.name: c.status for c in diff_checkpoints(tmp_path / "step_00000001", tmp_path / "step_00000002")}
    assert changes["0.weight"] == "same" and changes["2.weight"] == "changed"
    shown = CliRunner().invoke(app, ["show", str(tmp_path), "2"]).output
    assert "delta of step 1" in shown and "LOSSY: optimizer" in shown
    details = json.loads(CliRunner().invoke(app, ["show", str(tmp_path), "2", "--json"]).output)
    assert details["encoding"]["delta_of"] == 1 and details["encoding"]["lossy"]["optimizer"]["tensors"] > 0


def test_mirror_push_and_pull_carry_the_base(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = run_saves(run, 3, delta_every=3)
    url = f"file://{tmp_path / 'mirror'}"
    report = push(run, url, steps=[3])
    assert sorted(report.done) == [1, 3]
    report = pull(url, tmp_path / "copy", latest=True)
    assert sorted(report.done) == [1, 3]
    assert parents(tmp_path / "copy") == {1: None, 3: 1}
    assert_bitwise(restored(tmp_path / "copy"), saved[3])


def test_restore_from_the_mirror_fetches_a_delta_base(tmp_path: Path) -> None:
    run = tmp_path / "run"
    url = f"file://{tmp_path / 'mirror'}"
    state = new_state()
    with CheckpointManager(run, delta_every=3, mirror=url) as ckpt:
        ckpt.restore(state)
        for step in (1, 2):
            train(state, 1, seed=step)
            ckpt.save(step, state)
        expected = snapshot(state)
    shutil.rmtree(run / "step_00000001")  # the local base is gone; the mirror has it
    state = new_state(seed=4)
    with CheckpointManager(run, mirror=url) as ckpt:
        assert ckpt.restore(state) == 2
    assert_bitwise(snapshot(state), expected)


# ------------------------------------------------------------------------------ 8-bit moments


def test_quantised_moments_error_is_bounded_and_weights_are_never_touched() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 70, generator=g) * torch.logspace(-8, -1, 70)  # many orders of magnitude
    v = m.square() * torch.rand(300, 70, generator=g)
    tensors = {"state.0.exp_avg": m, "state.0.exp_avg_sq": v, "state.0.step": torch.tensor(3.0),
               "state.1.exp_avg": torch.ones(10)}  # too small: kept exact
    encoded = {"state": {}, "param_groups": []}
    packed, record = quantize_moments(tensors, encoded)
    assert record is not None and set(record["tensors"]) == {"state.0.exp_avg", "state.0.exp_avg_sq"}
    assert packed["state.0.exp_avg::q8"].dtype == torch.int8 and packed["state.0.exp_avg_sq::q8"].dtype == torch.uint8
    back = dequantize(packed, record, Path("x"))
    assert torch.equal(back["state.0.step"], tensors["state.0.step"])
    assert torch.equal(back["state.1.exp_avg"], tensors["state.1.exp_avg"])
    blocks = lambda t: torch.nn.functional.pad(t.reshape(-1), (0, -t.numel() % BLOCK)).view(-1, BLOCK)  # noqa: E731
    scale = blocks(m).abs().amax(1, keepdim=True) / 127
    assert ((blocks(back["state.0.exp_avg"]) - blocks(m)).abs() <= scale / 2 * (1 + 1e-5)).all()
    root_scale = blocks(v.sqrt()).amax(1, keepdim=True) / 255
    err = blocks(back["state.0.exp_avg_sq"].sqrt()) - blocks(v.sqrt())
    assert (err <= root_scale * (1 + 1e-5)).all() and (err >= -1e-6 * blocks(v.sqrt())).all()  # rounded up
    # a model's state dict is never quantised, whatever its tensor names
    assert quantize_moments({"state.0.exp_avg": m}, {"state.0.exp_avg": {"__tensor__": "x"}}) == ({"state.0.exp_avg": m}, None)


def test_8bit_moments_shrink_the_optimizer_and_training_resumes(tmp_path: Path) -> None:
    full = run_saves(tmp_path / "full", 1)
    run_saves(tmp_path / "q8", 1, quantize_optimizer=True)
    plain = read_manifest(tmp_path / "full" / "step_00000001")
    small = read_manifest(tmp_path / "q8" / "step_00000001")
    assert small.files["model.safetensors"].hash == plain.files["model.safetensors"].hash  # weights exact
    moments = sum(v.numel() * 4 for k, v in full[1].items() if k.endswith(("exp_avg", "exp_avg_sq")) and v.numel() >= 4096)
    saved_bytes = plain.files["optimizer.safetensors"].size - small.files["optimizer.safetensors"].size
    assert saved_bytes > 0.7 * moments  # ~3/4 of every quantised moment's bytes
    assert small.extra["lossy"]["optimizer"]["scheme"] == "absmax8-blockwise"

    exact, lossy = new_state(seed=8), new_state(seed=8)
    with CheckpointManager(tmp_path / "full") as ckpt:
        ckpt.restore(exact)
    with CheckpointManager(tmp_path / "q8") as ckpt:
        ckpt.restore(lossy)
    for a, b in zip(exact["optimizer"].state.values(), lossy["optimizer"].state.values()):
        assert a["exp_avg"].dtype == b["exp_avg"].dtype == torch.float32
    assert_bitwise({k: v for k, v in snapshot(lossy).items() if k.startswith("model.")},
                   {k: v for k, v in full[1].items() if k.startswith("model.")})
    a, b = train(exact, 10, seed=11), train(lossy, 10, seed=11)
    assert all(torch.isfinite(torch.tensor(b)))
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(a)
    assert b[-1] < b[0]  # it still learns


def test_bad_options_are_refused(tmp_path: Path) -> None:
    for bad, match in [({"compress": "gzip"}, "compress must be 'zstd'"), ({"delta_every": 1}, "delta_every must be"),
                       ({"quantize_optimizer": "yes"}, "quantize_optimizer must be")]:
        with pytest.raises(ValueError, match=match):
            CheckpointManager(tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ crashes

# Trains and saves (compressed, deltas) each step; the expected weights of a step are on disk before its save.
CHILD = """
import os, sys
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from test_compact import new_state, train
from safepoint import CheckpointManager
run, last = sys.argv[1], int(sys.argv[2])
state = new_state()
with CheckpointManager(run, compress="zstd", delta_every=3) as ckpt:
    for step in range(ckpt.restore(state) + 1, last + 1):
        train(state, 1, seed=step)
        expected = os.path.join(os.path.dirname(run), f"expected-{{step}}.safetensors")
        save_file({{k: v.contiguous() for k, v in state["model"].state_dict().items()}}, expected + ".tmp")
        os.replace(expected + ".tmp", expected)
        ckpt.save(step, state)
"""


def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    return script


def check_resumes_exactly(tmp_path: Path, run: Path) -> int:
    """No unfinished save is listed, no committed one is skipped, and the newest restores exactly."""
    newest = list_checkpoints(run)[-1].step
    assert_no_orphan(run)
    state = new_state(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SafepointWarning)  # nothing committed may be skipped
        with CheckpointManager(run) as ckpt:
            assert ckpt.restore(state) == newest
    assert not any(".tmp-" in p.name for p in run.iterdir())
    expected = load_file(tmp_path / f"expected-{newest}.safetensors")
    assert_bitwise(dict(state["model"].state_dict()), expected)
    return newest


@pytest.mark.parametrize("fault", ["after_data:kill", "before_rename:kill"])
def test_kill9_during_a_compressed_delta_save_leaves_only_committed_checkpoints(tmp_path: Path, fault: str) -> None:
    script, run = child_script(tmp_path), tmp_path / "run"

    def child(last: int, fault: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(run), str(last)], env=train_env(fault),
                              capture_output=True, text=True, timeout=120)

    done = child(2)
    assert done.returncode == 0, done.stderr
    killed = child(3, fault)  # step 3 is a delta of 1; the process dies in the middle of saving it
    assert killed.returncode == -9, killed.stderr
    assert parents(run) == {1: None, 2: 1}
    assert any(".tmp-" in p.name for p in run.iterdir())  # the unfinished save is there, never listed
    assert check_resumes_exactly(tmp_path, run) == 2
    again = child(4)  # resumes: 3 is a delta of 1, 4 a new full checkpoint
    assert again.returncode == 0, again.stderr
    assert parents(run) == {1: None, 2: 1, 3: 1, 4: None}
    check_resumes_exactly(tmp_path, run)


def test_kill9_at_random_moments_of_delta_saves(tmp_path: Path) -> None:
    script, run = child_script(tmp_path), tmp_path / "run"
    rng = random.Random(0)
    seen = []
    for _ in range(3):
        before = len(list_checkpoints(run)) if run.exists() else 0
        proc = subprocess.Popen([sys.executable, str(script), str(run), "10000"], env=train_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while (not run.exists() or len(list_checkpoints(run)) <= before) and time.monotonic() < deadline:
                time.sleep(0.05)  # until this attempt committed something
            time.sleep(rng.random())
        finally:
            proc.kill()
            proc.wait()
        seen.append(check_resumes_exactly(tmp_path, run))
    assert seen == sorted(seen) and len(set(parents(run).values())) > 1  # it progressed, through deltas
