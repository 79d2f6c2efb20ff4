"""Tests for safepoint.data: exact, O(1) resume of the data position."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from safepoint.data import ResumableLoader, ResumableSampler


class Counting(Dataset):
    """Dataset of its indices that counts __getitem__ calls (in the main process)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.calls += 1
        return i


class Noisy(Dataset):
    """Index plus a random draw from the (worker's) torch RNG, to expose worker seeding."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, int(torch.randint(0, 1 << 30, ()))


def flat(batches) -> list[int]:
    return [int(x) for b in batches for x in b]


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# --- ResumableSampler -------------------------------------------------------------------


def test_sampler_orders_are_seeded_permutations_that_change_per_epoch() -> None:
    s = ResumableSampler(50, seed=3)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1 and s.epoch == 2 and s.index == 0
    t = ResumableSampler(range(50), seed=3)
    assert [list(t), list(t)] == [e0, e1]
    assert list(ResumableSampler(50, seed=4)) != e0
    assert len(s) == 50


def test_sampler_shuffle_false_is_identity() -> None:
    s = ResumableSampler(7, shuffle=False)
    assert list(s) == list(range(7)) and list(s) == list(range(7))


def test_sampler_resume_mid_epoch_matches_uninterrupted() -> None:
    reference = ResumableSampler(20, seed=1)
    expected = [list(reference) for _ in range(3)]

    s = ResumableSampler(20, seed=1)
    got = list(s)
    it = iter(s)
    got += [next(it) for _ in range(7)]  # into epoch 1
    state = roundtrip(s.state_dict())
    assert state == {"epoch": 1, "index": 7, "seed": 1, "length": 20, "shuffle": True}

    r = ResumableSampler(20, seed=1)
    r.load_state_dict(state)
    got += list(r) + list(r)
    assert got == [i for epoch in expected for i in epoch]


def test_sampler_set_epoch() -> None:
    s = ResumableSampler(10, seed=0)
    it = iter(s)
    next(it)
    s.set_epoch(0)  # same epoch keeps the position
    assert s.index == 1
    s.set_epoch(5)
    assert (s.epoch, s.index) == (5, 0)
    assert list(s) == s.epoch_order(5) != s.epoch_order(0)


def test_sampler_mismatch_raises_clear_value_error() -> None:
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"'seed'.*expected 1.*got 0"):
        ResumableSampler(10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'length'.*expected 11.*got 10"):
        ResumableSampler(11, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        ResumableSampler(10).load_state_dict({"epoch": 0})


# --- ResumableLoader --------------------------------------------------------------------


def test_loader_epoch_iteration_len_and_shuffle_false() -> None:
    loader = ResumableLoader(Counting(10), batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples_consumed"] == 0
    shuffled = ResumableLoader(Counting(10), batch_size=4, seed=0)
    e0, e1 = flat(shuffled), flat(shuffled)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_matches_uninterrupted_across_epochs(num_workers: int) -> None:
    n, bs, steps = 22, 4, 20  # 6 batches per epoch: crosses three epoch boundaries
    ref = ResumableLoader(Counting(n), batch_size=bs, seed=7, num_workers=num_workers)
    ref_it = ref.iter_forever()
    expected = [next(ref_it).tolist() for _ in range(steps)]

    got: list[list[int]] = []
    state = None
    for stop in (3, 6, 13, steps):  # interrupt mid-epoch, at an epoch end, mid-epoch again
        loader = ResumableLoader(Counting(n), batch_size=bs, seed=7, num_workers=num_workers)
        if state is not None:
            loader.load_state_dict(state)
        it = loader.iter_forever()
        while len(got) < stop:
            got.append(next(it).tolist())
        state = roundtrip(loader.state_dict())  # a "crash" right after this batch
        del it, loader
    assert got == expected


def test_loader_for_loop_resume_mid_epoch_and_at_epoch_end() -> None:
    ref = ResumableLoader(Counting(10), batch_size=3, seed=2)
    epoch0, epoch1 = [b.tolist() for b in ref], [b.tolist() for b in ref]

    loader = ResumableLoader(Counting(10), batch_size=3, seed=2)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["samples_consumed"]) == (0, 6)
    resumed = ResumableLoader(Counting(10), batch_size=3, seed=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == epoch0[2:]
    assert [b.tolist() for b in resumed] == epoch1

    # State taken after the last batch, before the loop noticed the end: the rest is empty.
    at_end = ResumableLoader(Counting(10), batch_size=3, seed=2)
    at_end.load_state_dict({**state, "samples_consumed": 10})
    assert list(at_end) == [] and at_end.epoch == 1
    assert [b.tolist() for b in at_end] == epoch1


def test_loader_restore_is_o1_no_replay() -> None:
    ds = Counting(1000)
    loader = ResumableLoader(ds, batch_size=10, seed=0)
    loader.load_state_dict({**loader.state_dict(), "epoch": 3, "samples_consumed": 950})
    assert ds.calls == 0
    rest = flat(loader)
    assert ds.calls == len(rest) == 50
    assert rest == ResumableSampler(1000, seed=0).epoch_order(3)[950:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_global_rng_untouched(num_workers: int) -> None:
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    loader = ResumableLoader(Counting(9), batch_size=2, seed=5, num_workers=num_workers)
    for _ in range(2):
        list(loader)
    it = loader.iter_forever()
    next(it)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_loader_worker_seeds_reproducible_per_epoch() -> None:
    def epoch1(loader: ResumableLoader) -> list:
        return [(b[0].tolist(), b[1].tolist()) for b in loader]

    ref = ResumableLoader(Noisy(), batch_size=3, seed=4, num_workers=2)
    noise0 = [b[1].tolist() for b in ref]
    expected = epoch1(ref)
    assert noise0 != [noise for _, noise in expected]  # fresh worker seeds each epoch
    resumed = ResumableLoader(Noisy(), batch_size=3, seed=4, num_workers=2)
    resumed.load_state_dict({**resumed.state_dict(), "epoch": 1})
    torch.manual_seed(999)  # a different global RNG must not change worker randomness
    assert epoch1(resumed) == expected


def test_loader_drop_last() -> None:
    ref = ResumableLoader(Counting(10), batch_size=4, seed=1, drop_last=True)
    assert len(ref) == 2
    expected = [b.tolist() for b in ref]
    assert [len(b) for b in expected] == [4, 4]
    loader = ResumableLoader(Counting(10), batch_size=4, seed=1, drop_last=True)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = ResumableLoader(Counting(10), batch_size=4, seed=1, drop_last=True)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == expected[1:]
    with pytest.raises(ValueError, match="no batches"):
        ResumableLoader(Counting(3), batch_size=4, drop_last=True).iter_forever()


def test_loader_state_dict_is_json_and_mismatch_is_clear() -> None:
    loader = ResumableLoader(Counting(10), batch_size=4, seed=1)
    state = loader.state_dict()
    assert roundtrip(state) == state
    assert set(state) == {"epoch", "samples_consumed", "seed", "length", "batch_size",
                          "shuffle", "drop_last"}
    for key, value in [("batch_size", 5), ("seed", 2), ("shuffle", False), ("drop_last", True)]:
        other = ResumableLoader(Counting(10), **{"batch_size": 4, "seed": 1, key: value})
        with pytest.raises(ValueError, match=rf"'{key}'.*expected .*got "):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"'length'.*expected 11.*got 10"):
        ResumableLoader(Counting(11), batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({**state, "samples_consumed": 11})


@pytest.mark.parametrize("key", ["sampler", "batch_sampler", "generator"])
def test_loader_refuses_order_kwargs(key: str) -> None:
    with pytest.raises(TypeError, match=key):
        ResumableLoader(Counting(4), batch_size=2, **{key: None})
    with pytest.raises(TypeError, match="in_order"):
        ResumableLoader(Counting(4), batch_size=2, in_order=False)


def test_a_live_iterator_follows_a_position_loaded_mid_run():
    loader = ResumableLoader(list(range(40)), batch_size=4, shuffle=True, seed=3)
    batches = loader.iter_forever()
    first = [next(batches).tolist() for _ in range(3)]
    saved = loader.state_dict()  # after batch 3
    later = [next(batches).tolist() for _ in range(4)]
    loader.load_state_dict(saved)  # e.g. a rollback restores the loader while training runs
    assert [next(batches).tolist() for _ in range(4)] == later
    assert first[0] != later[0]
