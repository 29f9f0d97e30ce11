"""The Features Replay authors' split rule, as the zoo's presets use it.

The rule itself (contiguous chunks of ``ceil(n/K)`` blocks, stem with the first, pool and
classifier with the last, and the even split when the chunks run out before K parts) is frzoo's
own :func:`frzoo.split.fr_split_points`, the one `split.k` uses for models without presets; this
module names a zoo model's blocks and builds its presets with it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

from frzoo.split import fr_split_points

__all__ = ["fr_split_points", "fr_split_presets", "stage_block_names"]


def stage_block_names(depths: Sequence[int], prefix: str = "layer") -> List[str]:
    """Module names of every block, in execution order: ``layer1.0 .. layerS.(n_S - 1)``."""
    return [f"{prefix}{stage}.{i}" for stage, depth in enumerate(depths, start=1)
            for i in range(depth)]


def fr_split_presets(blocks: Sequence[str], parts: Iterable[int] = (2, 3, 4)) -> Dict[int, List[str]]:
    """``{K: fr_split_points(blocks, K)}`` for each K in ``parts``."""
    return {int(k): fr_split_points(blocks, k) for k in parts}
