"""The Features Replay authors' split rule: what `split.k` cuts when no preset is registered, and
what the zoo's presets (frzoo_registry.split_rule) are.

The official FR code treats a network as the flat list ``[stem, block_1 .. block_n, pool+fc]``
and cuts it into contiguous chunks of ``ceil(n / K)`` blocks; the stem goes with the first chunk
and the pool and classifier with the last. A split point is the name of the module to cut BEFORE,
so the K-1 points of a K-part split are the names of the blocks that start parts 2..K.
"""
from __future__ import annotations

import math
from typing import List, Sequence

from torch import nn

from ..errors import FrzooError
from .chain import block_list


def fr_split_points(blocks: Sequence[str], num_parts: int) -> List[str]:
    """The K-1 split points (block names to cut before) of the authors' ceil(n/K) rule.

    When ``ceil(n/K)`` chunks run out before K parts (e.g. 9 blocks, K=4: chunks of 3 fill only
    3 parts), the rule would leave the last part with nothing but the pool and classifier; we
    then fall back to the most even split (the first ``n mod K`` parts get one block more:
    3, 2, 2, 2 blocks, cutting before blocks 3, 5 and 7).
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


def points_for_k(model: nn.Module, k: int) -> List[str]:
    """The authors' rule on the model's blocks (:func:`frzoo.split.chain.block_list`); where the
    forward chain has fewer than K, on the blocks of the traced forward
    (:func:`frzoo.split.profile.graph_blocks`), so any traceable model splits by K alone."""
    if k == 1:
        return []
    _, blocks, _ = block_list(model)
    if len(blocks) < k:
        from .profile import graph_blocks  # only models that are not chains pay for the trace
        try:
            traced = graph_blocks(model)
        except FrzooError:  # not traceable: the chain's count is all there is
            traced = []
        if len(traced) >= k:
            return fr_split_points(traced, k)
    if len(blocks) < k:
        raise FrzooError(f"cannot split {type(model).__name__} into K={k} parts: its forward "
                         f"chain has only {len(blocks)} blocks ({', '.join(blocks) or 'none'}). "
                         f"Use K <= {max(len(blocks), 1)} or give split.points.")
    return fr_split_points(blocks, k)
