"""Plain backprop over the same parts: the exact-gradient baseline (naive model parallelism)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import activation
from ..activation import Deltas, as_activation
from ..plugins import register_algorithm
from .base import Delta, ForwardResult, Input, PartAlgorithm, arrived


@register_algorithm("bp")
class Backprop(PartAlgorithm):
    """Each part keeps its graph and backpropagates the delta of the same iteration.

    Over K parts this computes exactly what one training loop over the unsplit model computes;
    the parts just wait for each other (forward and backward locked).
    """

    synchronous = True

    def forward(self, h_in: Input, target: Optional[Tensor], step: int) -> ForwardResult:
        if self.is_last:
            assert target is not None
            return self._last_part_forward(h_in, target, step)
        self._input = activation.leaves(as_activation(h_in), not self.is_first)
        with self.timed("forward"):
            self._output = self._run(self._input, step)
        return ForwardResult(output=activation.detached(self._output))

    def backward(self, delta: Delta, step: int) -> Optional[Deltas]:
        deltas = arrived(delta)
        with self.timed("backward"):
            if self.is_last:
                self._scaled_loss().backward()
            else:
                assert deltas is not None
                activation.backward(self._output, deltas)
        grad_in = None if self.is_first else activation.input_deltas(self._input)
        self._apply_update()
        del self._input  # drop the graph now, not at the next forward
        self.__dict__.pop("_output", None)
        self.__dict__.pop("_loss", None)
        return grad_in

    def expects_delta(self, step: int) -> bool:
        return not self.is_last

    def sends_delta(self, step: int) -> bool:
        return not self.is_first
