"""The Features Replay authors' split rule: what `split.k` cuts when no preset is registered.

The official FR code treats a network as the flat list ``[stem, block_1 .. block_n, pool+fc]``
and cuts it into contiguous chunks of ``ceil(n / K)`` blocks; the stem goes with the first chunk
and the pool and classifier with the last. A split point is the name of the module to cut BEFORE,
so the K-1 points of a K-part split are the names of the blocks that start parts 2..K.
"""
from __future__ import annotations

import math
from typing import List

from torch import nn

from ..errors import FrzooError
from .chain import block_list


def points_for_k(model: nn.Module, k: int) -> List[str]:
    """The authors' rule: blocks cut into contiguous chunks of ceil(n/K); stem goes with the first
    chunk, pool and classifier with the last."""
    if k == 1:
        return []
    _, blocks, _ = block_list(model)
    if len(blocks) < k:
        raise FrzooError(f"cannot split {type(model).__name__} into K={k} parts: its forward "
                         f"chain has only {len(blocks)} blocks ({', '.join(blocks) or 'none'}). "
                         f"Use K <= {max(len(blocks), 1)} or give split.points.")
    size = math.ceil(len(blocks) / k)
    points = [blocks[i] for i in range(size, len(blocks), size)]
    if len(points) != k - 1:  # ceil chunks can leave fewer parts than asked (e.g. 10 blocks, K=4)
        size = len(blocks) / k
        points = [blocks[round(i * size)] for i in range(1, k)]
    return points
