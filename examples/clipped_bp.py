"""A one-file frzoo plugin: the algorithm ``clipped_bp``, backprop with per-part gradient clipping.

Not installed anywhere: a recipe names the file in its ``plugins:`` list (a path relative to the
working directory, or absolute) and frzoo imports it before building the run:

    plugins: [examples/clipped_bp.py]
    algorithm: {name: clipped_bp}

An algorithm drives ONE part (see frzoo/algorithms/base.py); it never sees configs or processes.
"""
from __future__ import annotations

import torch

from frzoo import register_algorithm
from frzoo.algorithms.bp import Backprop

MAX_NORM = 1.0  # per part: each part clips its own gradient before its update


@register_algorithm("clipped_bp")
class ClippedBackprop(Backprop):
    """Plain backprop over the parts; each part clips its gradient norm to MAX_NORM."""

    updates = 0  # counts updates over all parts (lets tests see that this class ran)

    def _apply_update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.part.parameters(), MAX_NORM)
        type(self).updates += 1
        super()._apply_update()
