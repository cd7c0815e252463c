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
