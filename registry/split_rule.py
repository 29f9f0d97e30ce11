"""The Features Replay authors' split rule, as a function of block names.

The official FR code treats a network as the flat list ``[stem, block_1 .. block_n, pool+fc]`` and
cuts it into contiguous chunks of ``ceil(n / K)`` blocks; the stem goes with the first chunk and
the pool and classifier with the last. A split point is the name of the module to cut BEFORE, so
the K-1 points of a K-part split are the names of the blocks that start parts 2..K.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence


def stage_block_names(depths: Sequence[int], prefix: str = "layer") -> List[str]:
    """Module names of every block, in execution order: ``layer1.0 .. layerS.(n_S - 1)``."""
    return [f"{prefix}{stage}.{i}" for stage, depth in enumerate(depths, start=1)
            for i in range(depth)]


def fr_split_points(blocks: Sequence[str], num_parts: int) -> List[str]:
    """The K-1 split points (block names to cut before) of the authors' ceil(n/K) rule.

    When ``ceil(n/K)`` chunks run out before K parts (e.g. 9 blocks, K=4: chunks of 3 fill only
    3 parts), the rule would leave the last part with nothing but the pool and classifier; we
    then fall back to the most even split (the first ``n mod K`` parts get one block more).
    """
    n, k = len(blocks), int(num_parts)
    if k < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}.")
    if k > n:
        raise ValueError(f"cannot split {n} blocks into {k} parts with at least one block each; "
                         f"use num_parts <= {n}.")
    if k == 1:
        return []
    size = math.ceil(n / k)
    starts = [i * size for i in range(1, k)]
    if starts[-1] >= n:  # ceil rule leaves a part without blocks: use the even split instead
        q, r = divmod(n, k)
        sizes = [q + 1] * r + [q] * (k - r)
        starts = [sum(sizes[:i]) for i in range(1, k)]
    return [blocks[s] for s in starts]


def fr_split_presets(blocks: Sequence[str], parts: Iterable[int] = (2, 3, 4)) -> Dict[int, List[str]]:
    """``{K: fr_split_points(blocks, K)}`` for each K in ``parts``."""
    return {int(k): fr_split_points(blocks, k) for k in parts}
