"""Fast, single-process checks of the distributed pieces (the torchrun jobs are in test_distributed.py).

* ``DistributedResumableLoader``: ranks take disjoint slices of one global order, and a position
  saved at one world size continues at another with no sample repeated or skipped;
* DCP's pickled ``.metadata`` is read by a restricted unpickler: a planted payload never runs,
  and metadata pointing outside its directory is refused;
* consolidation and export work on single-process checkpoints too; without a process group the
  manager stays single-process.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch.utils.data import Dataset

from safepoint import CheckpointManager, CorruptCheckpoint, IncompatibleState, ResumableLoader
from safepoint.dist_data import DistributedResumableLoader
from safepoint.distributed import DistContext, export_consolidated, load_consolidated
from safepoint import sharded


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def loaders(world: int, n: int = 96, batch: int = 3, seed: int = 7) -> list[DistributedResumableLoader]:
    return [DistributedResumableLoader(Indices(n), batch_size=batch, seed=seed, rank=r, world_size=world)
            for r in range(world)]


def run_steps(group: list[DistributedResumableLoader], steps: int) -> list[int]:
    """``steps`` global steps: every rank takes one batch per step, as a training loop does."""
    iters = [iter(ld) for ld in group]
    seen: list[int] = []
    for _ in range(steps):
        for it in iters:
            seen += next(it).tolist()
    return seen


def test_ranks_take_disjoint_slices_of_one_global_order():
    group = loaders(4)
    order = group[0].sampler.epoch_order(0)
    first = [next(iter(ld)).tolist() for ld in group]
    assert first == [order[r * 3:(r + 1) * 3] for r in range(4)]
    states = [ld.state_dict() for ld in group]
    assert all(s == states[0] for s in states), "the position is global: every rank's state is the same"
    assert group[0].state_dict()["samples_consumed"] == 12


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4), (2, 1), (3, 2)])
def test_position_maps_to_another_world_size_without_repeats_or_skips(before, after):
    n, batch = 96, 3
    old = loaders(before, n, batch)
    seen = run_steps(old, 5)
    saved = old[0].state_dict()
    new = loaders(after, n, batch)
    for ld in new:
        ld.load_state_dict(saved)
    full_steps = (n - saved["samples_consumed"]) // (batch * after)
    seen += run_steps(new, full_steps)
    order = old[0].sampler.epoch_order(0)
    assert seen == order[:len(seen)], "the global order continued exactly"
    assert len(seen) == len(set(seen))
    assert n - len(seen) < batch * after, "only the epoch's tail of less than one global batch is dropped"


def test_epoch_ends_at_the_last_full_global_batch_and_crosses_over():
    group = loaders(2, n=20, batch=3)  # global batch 6: 3 steps per epoch, 2 samples dropped
    assert len(group[0]) == 3
    its = [ld.iter_forever() for ld in group]
    for _ in range(4):
        for it in its:
            next(it)
    assert group[0].state_dict()["epoch"] == 1 and group[0].state_dict()["samples_consumed"] == 6


def test_refuses_a_per_process_position_and_bad_settings():
    ld = loaders(2)[0]
    with pytest.raises(IncompatibleState, match="per-process"):
        ld.load_state_dict(ResumableLoader(Indices(96), batch_size=3, seed=7).state_dict())
    other = DistributedResumableLoader(Indices(96), batch_size=3, seed=8, rank=0, world_size=2)
    with pytest.raises(IncompatibleState, match="seed"):
        ld.load_state_dict(other.state_dict())
    with pytest.raises(TypeError, match="drop_last"):
        DistributedResumableLoader(Indices(8), batch_size=2, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        DistributedResumableLoader(Indices(8), batch_size=2, rank=2, world_size=2)


def _dcp_dir(tmp_path):
    tensors = {"model.w": torch.arange(6.0).reshape(2, 3), "model.b": torch.ones(3)}
    sharded.write_dcp(tensors, tmp_path / "dcp")
    return tmp_path / "dcp", tensors


def test_metadata_is_read_without_running_code(tmp_path):
    directory, tensors = _dcp_dir(tmp_path)
    assert sharded.saved_shapes(directory) == {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    targets = {k: torch.zeros_like(v) for k, v in tensors.items()}
    sharded.load_dcp(targets, directory)
    assert all(torch.equal(targets[k], tensors[k]) for k in tensors)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (directory / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CorruptCheckpoint, match="refusing"):
        sharded.read_metadata(directory)
    assert not marker.exists()


def test_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    import dataclasses

    directory, _ = _dcp_dir(tmp_path)
    md = sharded.read_metadata(directory)
    md.storage_data = {k: dataclasses.replace(v, relative_path="../../etc/passwd") for k, v in md.storage_data.items()}
    (directory / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CorruptCheckpoint, match="outside"):
        sharded.read_metadata(directory)


def test_consolidate_and_export_a_single_process_checkpoint(tmp_path):
    from safetensors.torch import load_file

    assert DistContext.current() is None  # no process group: the manager stays single-process
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(tmp_path / "run") as ckpt:
        ckpt.restore({"model": model})
        info = ckpt.save(3, {"model": model})
    got = load_consolidated(info.path, "model")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    out = export_consolidated(info.path, tmp_path / "out" / "model.safetensors", dtype=torch.bfloat16)
    exported = load_file(str(out))
    assert exported["weight"].dtype == torch.bfloat16 and sorted(exported) == ["bias", "weight"]
    with pytest.raises(Exception, match="no tensors for entry 'optimizer'"):
        load_consolidated(info.path, "optimizer")
