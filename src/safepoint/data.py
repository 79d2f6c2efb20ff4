"""Resumable data position: a killed run resumes at exactly the next sample.

A checkpoint of model and optimizer is not an exact resume if the data order restarts, or
if it is recovered by replaying batches (slow, and it re-runs dataset I/O). This module keeps
the data position as a few JSON-friendly integers and restores it in O(1):

* the order of epoch ``e`` is a pure function of ``(seed, e, length)``, recomputed on resume
  and sliced at the saved position; no sample before it is read again;
* ``ResumableLoader`` counts what the consumer *received*, not what the sampler or workers
  prefetched, so its position is exact with ``num_workers > 0`` too;
* nothing here draws from the global torch / ``random`` / numpy RNG: orders use private
  generators, and the ``DataLoader`` gets its own ``generator`` seeded from ``(seed, epoch)``
  (otherwise every ``iter(dataloader)`` draws a base seed from the global torch RNG).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .errors import IncompatibleState

__all__ = ["ResumableSampler", "ResumableLoader"]

_MASK64 = (1 << 64) - 1


def _derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A 64-bit seed for (seed, epoch, stream): splitmix64 over a golden-ratio walk."""
    x = (seed + epoch * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _check_match(
    kind: str, state: dict[str, Any], expected: dict[str, Any], position: tuple[str, ...]
) -> None:
    """Raise IncompatibleState (a ValueError) if a saved setting differs from this object's."""
    missing = [k for k in (*position, *expected) if k not in state]
    if missing:
        raise IncompatibleState(
            f"{kind} state is missing keys {missing}; expected a dict from {kind}.state_dict()"
        )
    for key, want in expected.items():
        if state[key] != want:
            raise IncompatibleState(
                f"{kind} state mismatch for {key!r}: expected {want!r} (this {kind}), got "
                f"{state[key]!r} (checkpoint). Rebuild the {kind} with {key}={state[key]!r} "
                f"to resume this run, or do not load its data state to start a new order."
            )


def _checked_position(kind: str, state: dict[str, Any], length: int) -> tuple[int, int]:
    """The saved (epoch, samples consumed), or IncompatibleState when out of range."""
    epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
    if epoch < 0 or not 0 <= consumed <= length:
        raise IncompatibleState(
            f"{kind} state out of range: epoch={epoch}, samples_consumed={consumed} "
            f"(need epoch >= 0 and 0 <= samples_consumed <= length={length})")
    return epoch, consumed


def _endless(loader: Any) -> Iterator[Any]:
    """Epoch after epoch of ``iter(loader)``, for step-based training loops."""
    while True:
        yield from iter(loader)


class ResumableSampler(Sampler[int]):
    """Sampler whose position ``(epoch, index)`` can be saved and restored in O(1).

    Iterating yields the current epoch's order from ``index`` on, advancing ``index`` as it
    yields; once the epoch is exhausted, ``epoch += 1`` and ``index = 0``.

    Inside a ``DataLoader`` this sampler's ``index`` runs ahead of what the training loop has
    consumed (the loader prefetches), so checkpoint a :class:`ResumableLoader` instead there.
    """

    def __init__(
        self, data_source_or_length: Sized | int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        if isinstance(data_source_or_length, int) and not isinstance(data_source_or_length, bool):
            length = data_source_or_length
        else:
            length = len(data_source_or_length)  # type: ignore[arg-type]
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.epoch = 0
        self.index = 0

    def epoch_order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: a pure function of (seed, epoch, length)."""
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, 0))
        return torch.randperm(self.length, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        while self.index < len(order):
            self.index += 1  # count before yielding: state taken after receiving it is past it
            yield order[self.index - 1]
        self.epoch += 1
        self.index = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (like ``DistributedSampler``); a new epoch starts at index 0."""
        if epoch != self.epoch:
            self.epoch, self.index = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "length": self.length, "shuffle": self.shuffle}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_match("ResumableSampler", state_dict,
                     {"seed": self.seed, "length": self.length, "shuffle": self.shuffle},
                     ("epoch", "index"))
        epoch, index = int(state_dict["epoch"]), int(state_dict["index"])
        if epoch < 0 or not 0 <= index <= self.length:
            raise IncompatibleState(
                f"ResumableSampler state out of range: epoch={epoch}, index={index} "
                f"(need epoch >= 0 and 0 <= index <= length={self.length})")
        self.epoch, self.index = epoch, index


class ResumableLoader:
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is what was yielded.

    ``for batch in loader`` runs the rest of the current epoch, then advances the epoch;
    :meth:`iter_forever` crosses epochs for step-based loops. ``state_dict()`` taken between
    any two batches resumes at exactly the next batch, with any ``num_workers``.

    Other ``DataLoader`` options go through ``dataloader_kwargs``; ``sampler``,
    ``batch_sampler``, ``generator`` and ``in_order=False`` are refused (order is ours). Worker
    seeds derive from ``(seed, epoch)``, so in-worker randomness repeats exactly when resuming
    at an epoch boundary; mid-epoch, batches land on different workers than in the original
    run (keep randomness that must be exact out of workers, or use ``num_workers=0``).
    With ``persistent_workers=True`` worker seeds are fixed by the first epoch iterated.
    Use one iterator at a time.
    """

    _REFUSED = ("sampler", "batch_sampler", "generator")

    def __init__(self, dataset: Any, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, **dataloader_kwargs: Any) -> None:
        bad = [k for k in self._REFUSED if k in dataloader_kwargs]
        if bad:
            raise TypeError(f"ResumableLoader sets {bad} itself; use its own shuffle=/seed= "
                            f"arguments instead of passing them to the DataLoader")
        if dataloader_kwargs.get("in_order", True) is False:
            raise TypeError("ResumableLoader needs in_order=True: out-of-order batches make "
                            "the consumed position ambiguous")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.epoch = 0
        self.samples_consumed = 0
        self._generation = 0  # bumped by load_state_dict, so live iterators follow a restore
        self._generator = torch.Generator()  # reseeded per epoch; the global RNG stays untouched
        self.dataloader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler,
                                     drop_last=self.drop_last, generator=self._generator,
                                     **dataloader_kwargs)

    @property
    def length(self) -> int:
        return self.sampler.length

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def __len__(self) -> int:
        """Batches per full epoch."""
        full, rest = divmod(self.length, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Any]:
        # Rest of the current epoch, then epoch += 1. Position is set from what was consumed;
        # the sampler's own index runs ahead with prefetching and is never the source of truth.
        self.sampler.epoch, self.sampler.index = self.epoch, self.samples_consumed
        self._generator.manual_seed(_derive_seed(self.seed, self.epoch, 1))
        generation = self._generation
        for batch in self.dataloader:
            self.samples_consumed = min(self.samples_consumed + self.batch_size, self.length)
            yield batch  # counted above: a state taken now resumes after this batch
            if self._generation != generation:
                return  # a position was loaded meanwhile (a rollback): stop; iter_forever resumes there
        self.epoch += 1
        self.samples_consumed = 0

    def iter_forever(self) -> Iterator[Any]:
        """Endless batches across epoch boundaries, for step-based training loops.

        If the position is loaded while this iterator is live (a rollback restores the loader
        mid-run), the next batch comes from the loaded position.
        """
        if len(self) == 0:
            raise ValueError(f"an epoch of {self.length} samples with batch_size="
                             f"{self.batch_size}, drop_last={self.drop_last} has no batches")
        return _endless(self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed,
                "seed": self.seed, "length": self.length, "batch_size": self.batch_size,
                "shuffle": self.sampler.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position in O(1): the epoch order is recomputed and sliced, not replayed."""
        _check_match("ResumableLoader", state_dict,
                     {"length": self.length, "batch_size": self.batch_size, "seed": self.seed,
                      "shuffle": self.sampler.shuffle, "drop_last": self.drop_last},
                     ("epoch", "samples_consumed"))
        self.epoch, self.samples_consumed = _checked_position("ResumableLoader", state_dict, self.length)
        self._generation += 1
