"""Inception Score from classifier logits."""
from __future__ import annotations

import math

import torch

ADM_SPLIT_SIZE = 5000


def inception_score(logits, splits: int = 10, *, split_size: int | None = None) -> float:
    """IS = exp( E_x KL( p(y|x) || p(y) ) ), averaged over splits of the set.

    p(y|x) = softmax(logits[x]); p(y) is the mean of p(y|x) over the split, so
    KL = sum_y p(y|x) (log p(y|x) - log p(y)); the score is exp of the split's mean KL, and the
    result is the mean of the splits' scores. It ranges from 1 (every prediction the same) to the
    number of classes (confident predictions spread evenly over all classes).

    ``logits``: (N, K) array or tensor. The set is cut into ``splits`` contiguous, near-equal parts,
    or, with ``split_size``, into consecutive parts of that many (the last may be shorter): ADM's
    evaluator uses ``split_size=5000``, i.e. 10 splits of 50k samples. ADM feeds Inception's logits
    without the bias (``InceptionV3Features(...)["logits"]``). Computed in float64.
    """
    x = torch.as_tensor(logits).detach().cpu().double()
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2 classes, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("logits contain NaN or infinite values")
    n = x.shape[0]
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be positive, got {split_size}")
        bounds = [(s, min(s + split_size, n)) for s in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"splits must be between 1 and the number of samples ({n}), got {splits}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for start, end in bounds:
        part = log_p[start:end]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(end - start)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return sum(scores) / len(scores)
