"""Decoupled Parallel Backpropagation (Huo et al., ICML 2018): the paper's main baseline.

Part k keeps the forward graph of iteration t and backpropagates it K-k iterations later with the
delta that arrives then; the gradient is applied to the current weights. Unlike Features Replay
there is no recomputation, so K-k+1 graphs (all their activations) stay alive in part k: the
memory blow-up the Features Replay paper measures.

The graph of iteration t was built with the weights of iteration t. PyTorch (rightly) refuses to
backpropagate through a graph whose saved weights were since updated in place, so each stored
graph is built on a detached copy of the part's parameters (weight stashing); its gradient is
then added to the live parameters. BatchNorm buffers are the live ones (updated once, at the
forward). The copies cost K-k parameter sets per part, small beside the stored activations.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Literal, Optional, Tuple

from torch import Tensor
from torch.func import functional_call

from .. import activation
from ..activation import Activation, Deltas, as_activation
from ..plugins import register_algorithm
from .base import (DelayedPart, Delta, ForwardResult, Input, PartAlgorithm, arrived,
                   frozen_bn_stats, seeded, step_seed)

# step, input leaves, outputs, weight copies (activations are tuples: frzoo.activation)
Graph = Tuple[int, Activation, Activation, Dict[str, Tensor]]


@register_algorithm("ddg")
class DecoupledBackprop(DelayedPart):
    """One part under DDG. Options: warmup ('skip' or 'zeros'), as for Features Replay."""

    @dataclass(frozen=True)
    class Options(PartAlgorithm.Options):
        warmup: Literal["skip", "zeros"] = "skip"

    batch_state_keys = ("inputs",)  # per-sample: each replica holds its rows (PartAlgorithm)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup = self.options.warmup
        self.graphs: Deque[Graph] = deque()

    @classmethod
    def memory_cost(cls, index: int, num_parts: int, *, weights: float, saved: float,
                    input_bytes: float) -> float:
        """K - k + 1 graphs and K - k more inputs (the time cost is backprop's: F + B)."""
        extra = cls.staleness_of(index, num_parts)
        return weights + saved * (extra + 1) + extra * input_bytes

    def forward(self, h_in: Input, target: Optional[Tensor], step: int) -> ForwardResult:
        if self.is_last:
            assert target is not None
            return self._last_part_forward(h_in, target, step)
        x = activation.leaves(as_activation(h_in), not self.is_first)
        weights = {n: p.detach().clone().requires_grad_(True)
                   for n, p in self.part.named_parameters()}
        with self.timed("forward"):
            out = self._run_with(weights, x, step)
        self.graphs.append((step, x, out, weights))
        return ForwardResult(output=activation.detached(out))

    def _run_with(self, weights: Dict[str, Tensor], x: Activation, step: int) -> Activation:
        with seeded(step_seed(self.seed, step, self.index), self.device), self._recording():
            return as_activation(functional_call(self.part, weights, x, strict=False))

    def backward(self, delta: Delta, step: int) -> Optional[Deltas]:
        if self.is_last:  # staleness 0: plain backprop of the loss computed in forward()
            return self._last_part_backward()
        stale_step = step - self.delay
        if stale_step < self.origin:  # warm-up: no stale sample exists yet
            self._warmup_update(self.warmup)
            return None
        sample_step, x, out, weights = self.graphs.popleft()
        assert sample_step == stale_step, (sample_step, stale_step)
        deltas = arrived(delta)
        assert deltas is not None
        with self.timed("backward"):
            # through the graph of iteration t-(K-k), at its own weights
            activation.backward(out, deltas)
        for name, p in self.part.named_parameters():
            p.grad = weights[name].grad  # the stale gradient, applied to the current weights
        grad_in = None if self.is_first else activation.input_deltas(x)
        self._apply_update()
        return grad_in

    def held_tensors(self) -> List[Tensor]:
        # the stored inputs and weight copies; the graphs' saved activations are counted as saved
        return [t for _, x, _, ws in self.graphs for t in (*x, *ws.values())]

    def state_dict(self) -> Dict[str, Any]:
        # A live graph cannot be saved; its input and weight copies can, and rebuild it exactly.
        return {"steps": [s for s, _, _, _ in self.graphs],
                "inputs": [activation.to_saved(x) for _, x, _, _ in self.graphs],
                "weights": [{n: w.detach().cpu() for n, w in ws.items()} for _, _, _, ws in self.graphs]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.graphs = deque()
        for step, x, ws in zip(state["steps"], state["inputs"], state["weights"]):
            x = activation.leaves(activation.from_saved(x, self.device), not self.is_first)
            weights = {n: w.to(self.device).requires_grad_(True) for n, w in ws.items()}
            with frozen_bn_stats(self.part):  # the first forward already updated the statistics
                out = self._run_with(weights, x, int(step))
            self.graphs.append((int(step), x, out, weights))
