"""Seeds derived from tuples of integers: the one rule behind every reproducible random stream in ctok.

Training draws per step (data order, per-sample noise, masks) and generation draws per image
(``ctok generate``'s image i) each seed their own ``torch.Generator`` from a tuple such as
(run seed, stream, step) or (seed, image index). Hashing the tuple, rather than adding its parts,
keeps neighbouring tuples' streams unrelated.
"""
from __future__ import annotations

import numpy as np


def derived_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededIndex(int):
    """A dataset index that also names its sample's own random stream: ``seed`` is
    ``derived_seed(*stream, index)``.

    :class:`ctok.training.sharding.GlobalBatchSampler` yields these, with a stream of (run seed,
    stream constant, epoch), so that a dataset's per-sample augmentation (a random crop, a flip)
    depends on the run, the epoch and the sample only: not on the DataLoader worker that reads it,
    the process that holds it or the step a resumed run starts from, whose global generators differ.
    Everywhere else it is the plain int (list, NumPy and tensor indexing; arithmetic gives ints), so
    datasets that draw nothing need not know it. The seed is hashed when first read, in the worker.
    """

    def __new__(cls, index: int, stream: tuple[int, ...]):
        self = super().__new__(cls, index)
        self.stream = tuple(int(w) for w in stream)
        return self

    def __reduce__(self):  # to DataLoader workers, stream included (int's own pickling would drop it)
        return SeededIndex, (int(self), self.stream)

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, stream={self.stream})"

    @property
    def seed(self) -> int:
        return derived_seed(*self.stream, int(self))
