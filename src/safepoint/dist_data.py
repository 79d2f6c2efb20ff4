"""A data position that survives a change of world size.

``ResumableLoader`` counts what *one* process consumed, which cannot say where a job with a
different number of ranks should continue. Here every rank walks the same global order of an
epoch (a pure function of ``(seed, epoch)``) in global batches of ``batch_size * world_size``
samples; rank ``r`` takes the ``r``-th slice of ``batch_size`` from each. The position is the
*global* count of samples consumed, identical on every rank, so it maps to any world size: a job
resumed with 2 ranks from a checkpoint written by 4 continues at the same global sample, and no
sample is repeated or skipped. Each epoch ends at the last full global batch (the tail of fewer
than ``batch_size * world_size`` samples is dropped, as ``DistributedSampler(drop_last=True)``
does), so every rank sees the same number of equal batches and no rank waits in a collective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .data import ResumableSampler, _check_match, _checked_position, _derive_seed, _endless
from .errors import IncompatibleState

__all__ = ["DistributedResumableLoader"]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    live = dist.is_available() and dist.is_initialized()
    world_size = world_size if world_size is not None else (dist.get_world_size() if live else 1)
    rank = rank if rank is not None else (dist.get_rank() if live else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class _RankSampler(Sampler[int]):
    """This rank's indices from the loader's global position on: its slice of each global batch."""

    def __init__(self, loader: "DistributedResumableLoader") -> None:
        self.loader = loader
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        ld = self.loader
        order, size, b = ld.sampler.epoch_order(ld.epoch), ld.global_batch_size, ld.batch_size
        at = self.start
        while at + size <= len(order):
            yield from order[at + ld.rank * b: at + (ld.rank + 1) * b]
            at += size

    def __len__(self) -> int:
        ld = self.loader
        return (ld.length - self.start) // ld.global_batch_size * ld.batch_size


class DistributedResumableLoader:
    """A ``DataLoader`` over this rank's share of one global order, resumable at any world size.

    ``batch_size`` is per rank. ``rank`` / ``world_size`` default to ``torch.distributed``'s (0 and
    1 without a process group). ``state_dict()`` holds the global position and is the same on
    every rank; ``load_state_dict`` accepts a state saved at another world size or per-rank batch
    size and continues at the same global sample. Options as for ``ResumableLoader`` (worker
    seeds derive from ``(seed, epoch, rank)``).
    """

    _REFUSED = ("sampler", "batch_sampler", "generator", "drop_last")

    def __init__(self, dataset: Sized, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, **dataloader_kwargs: Any) -> None:
        bad = [k for k in self._REFUSED if k in dataloader_kwargs]
        if bad:
            raise TypeError(f"DistributedResumableLoader sets {bad} itself (epochs end at the last full "
                            "global batch); use its shuffle=/seed= arguments")
        if dataloader_kwargs.get("in_order", True) is False:
            raise TypeError("DistributedResumableLoader needs in_order=True")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)  # the global order
        self.batch_size = int(batch_size)
        self.epoch = 0
        self.samples_consumed = 0  # global: samples of this epoch consumed by all ranks together
        self._rank_sampler = _RankSampler(self)
        self._generator = torch.Generator()
        self.dataloader = DataLoader(dataset, batch_size=self.batch_size, sampler=self._rank_sampler,
                                     drop_last=False, generator=self._generator, **dataloader_kwargs)

    @property
    def length(self) -> int:
        return self.sampler.length

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per full epoch (the same on every rank)."""
        return self.length // self.global_batch_size

    def __iter__(self) -> Iterator[Any]:
        self._rank_sampler.start = self.samples_consumed
        self._generator.manual_seed(_derive_seed(self.seed, self.epoch, 2 + self.rank))
        for batch in self.dataloader:
            self.samples_consumed += self.global_batch_size  # counted before yielding, as ResumableLoader
            yield batch
        self.epoch += 1
        self.samples_consumed = 0

    def iter_forever(self) -> Iterator[Any]:
        """Endless batches across epoch boundaries, for step-based training loops."""
        if len(self) == 0:
            raise ValueError(f"an epoch of {self.length} samples has no full global batch of "
                             f"{self.batch_size} x {self.world_size} ranks")
        return _endless(self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "seed": self.seed,
                "length": self.length, "shuffle": self.sampler.shuffle, "batch_size": self.batch_size,
                "world_size": self.world_size, "global": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved global sample; the world size and batch size may differ."""
        if not state_dict.get("global"):
            raise IncompatibleState(
                "DistributedResumableLoader cannot load a per-process ResumableLoader state: its "
                "position counts one process's samples, not the job's. Resume with the loader type "
                "the run was saved with")
        _check_match("DistributedResumableLoader", state_dict,
                     {"length": self.length, "seed": self.seed, "shuffle": self.sampler.shuffle},
                     ("epoch", "samples_consumed"))
        self.epoch, self.samples_consumed = _checked_position("DistributedResumableLoader", state_dict, self.length)
