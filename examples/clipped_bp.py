"""A one-file frzoo plugin: the algorithm ``clipped_bp``, backprop with per-part gradient clipping.

Not installed anywhere: a recipe names the file in its ``plugins:`` list (a path relative to the
working directory, or absolute) and frzoo imports it before building the run:

    plugins: [examples/clipped_bp.py]
    algorithm: {name: clipped_bp, max_norm: 0.5}

An algorithm drives ONE part (see frzoo/algorithms/base.py); it never sees configs or processes.
The options a recipe may give it besides ``name`` are the fields of its ``Options`` dataclass
(see frzoo/algorithms/options.py), typed and checked by OmegaConf like every recipe section, with
value rules beside the fields (frzoo/rules.py): frzoo checks them when the run is built and
passes them in as ``self.options``. Another registered algorithm's option (fr's ``warmup``) is
dropped with a note, so a recipe written for fr runs with ``algorithm.name=clipped_bp``; any other
key under ``algorithm:`` is an error naming this class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frzoo import register_algorithm
from frzoo.algorithms.bp import Backprop
from frzoo.rules import positive


@register_algorithm("clipped_bp")
class ClippedBackprop(Backprop):
    """Plain backprop over the parts; each part clips its own gradient norm to `max_norm`."""

    @dataclass(frozen=True)
    class Options(Backprop.Options):
        # per part: each part clips its own gradient before its update; positive (a rule beside
        # the field; a rule no field states alone goes in __post_init__, raising ValueError)
        max_norm: float = positive(1.0)

    updates = 0  # counts updates over all parts (lets tests see that this class ran)

    def _apply_update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.part.parameters(), self.options.max_norm)
        type(self).updates += 1
        super()._apply_update()
