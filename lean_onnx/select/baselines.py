"""The magnitude baselines (lean-spec 6): keep the kernels whose individual score passes a global
percentile threshold (`sv`: operator norm x folded BN, `l1`: L1 norm)."""

from __future__ import annotations

import numpy as np


def threshold_keep_mask(scores, candidates, num_keep):
    """IndivSV / IndivL1 global magnitude selection (lean-spec 6).

    Among candidate edges with score > 0 (0 = already pruned, excluded), with ``n`` of them:
    ``perc = 1 - num_keep / n``, ``theta = np.percentile(scores, 100*perc)`` (linear interpolation),
    keep the candidates with ``score >= theta`` (ties at theta are all kept, so the count may exceed
    ``num_keep``).  ``num_keep >= n`` keeps all of them; ``num_keep <= 0`` keeps none (the reference's
    formula would keep the maximum-score kernels).
    """
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.bool_)
    if scores.shape != candidates.shape or scores.ndim != 1:
        raise ValueError("scores and candidates must be 1-D arrays of the same length")
    live = candidates & (scores > 0)
    n = int(np.count_nonzero(live))
    num_keep = int(num_keep)
    if num_keep >= n:
        return live
    if num_keep <= 0:
        return np.zeros_like(live)
    perc = 1.0 - num_keep / n
    theta = np.percentile(scores[live], 100.0 * perc)
    return live & (scores >= theta)
