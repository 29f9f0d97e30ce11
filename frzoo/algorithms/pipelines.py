"""Synchronous pipeline schedules over the same parts: GPipe, 1F1B and zero-bubble ZB-H1.

Each splits a step's batch into M micro-batches (`algorithm.microbatches`, default K), runs every
micro-batch's forward and backward through the parts and makes ONE optimizer step per part when
all are done, so the step computes exactly what one process computes with gradient
accumulation over the unsplit model: each micro-batch's loss divided by M, the gradients summed
in micro-batch order, one step. The three differ only in the ORDER of each part's actions
(frzoo.algorithms.actions), which changes the time and the memory, never the numbers:

- ``gpipe``  all M forwards, then all M backwards (Huang et al., 2019);
- ``1f1b``   part k (0-based) runs K-1-k forwards ahead (warm-up), then alternates one forward
             and one backward, then the remaining backwards (PipeDream-Flush, Narayanan 2021);
- ``zb1``    1F1B with each backward split into the input gradient (I), sent to the part below
             at once, and the weight gradient (W), computed while the delta travels and the part
             below works on it. Every hop of the cool-down, where 1F1B's parts wait for the
             delta from above, gets shorter by W: the bubble shrinks from 1F1B's
             (K-1)(F+B) to (K-1)(F+B-W) (ZB-H1, Qi et al., ICLR 2024, section 2.1), and since W
             follows its I, part k holds min(K-k, M) graphs, as in 1F1B. The first part sends
             no delta, so it runs B whole.

Each micro-batch runs with batch statistics in BatchNorm (as GPipe does: the running statistics
are updated once per micro-batch), and with the dropout masks of seed (run seed, step, micro-batch,
part). With M = 1 a step is plain backprop (``bp``), bit for bit. The step ends with the pipeline
drained, so a checkpoint holds no state of these algorithms.

The split of the backward (zb1) uses torch.distributed.pipelining's own input/weight backward
(``stage_backward_input`` / ``stage_backward_weight``: the input gradient with the graph
retained, the weight gradient later from the gradients saved at the nodes that use weights), so
W does only the weight half of the work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from .. import activation
from ..activation import Activation, Deltas, as_activation
from .actions import (BACKWARD, FORWARD, INPUT_GRAD, UPDATE, WEIGHT_GRAD, Action,
                                 check_lists)
from ..plugins import register_algorithm
from ..rules import positive
from .base import ForwardResult, Input, PartAlgorithm, seeded, step_seed


class SyncPipeline(PartAlgorithm):
    """One part under a synchronous schedule of M micro-batches (module docstring). The
    executors run the actions of :meth:`schedule` (frzoo.algorithms.actions) and call
    :meth:`micro_forward`, :meth:`micro_backward` (B), :meth:`input_backward` (I),
    :meth:`weight_backward` (W) and :meth:`update` (U)."""

    synchronous = True
    runs_actions = True  # the executors run :meth:`schedule`, not forward()/backward()

    @dataclass(frozen=True)
    class Options(PartAlgorithm.Options):
        #: micro-batches per step; None: K (the number of parts)
        microbatches: Optional[int] = positive(None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.microbatches = self.options.microbatches or self.num_parts
        # per micro-batch in flight: (input leaves, output or loss) with their graph
        self.graphs: Dict[int, Tuple[Activation, Tuple[Tensor, ...]]] = {}
        self.param_groups: Dict[int, Any] = {}  # zb1: what W m needs, saved by I m
        self.results: List[ForwardResult] = []  # the last part's micro-batches, for metrics

    # -- the schedule
    @classmethod
    def part_actions(cls, index: int, num_parts: int, microbatches: int) -> List[Action]:
        raise NotImplementedError

    @classmethod
    def schedule(cls, num_parts: int, microbatches: int) -> List[List[Action]]:
        """Every part's actions for one step, checked (frzoo.algorithms.actions.check_lists)."""
        lists = [cls.part_actions(k, num_parts, microbatches) for k in range(num_parts)]
        check_lists(lists, microbatches)
        return lists

    @classmethod
    def staleness_of(cls, index: int, num_parts: int) -> int:
        return 0

    # -- the actions
    def micro_forward(self, h_in: Input, target: Optional[Tensor], step: int,
                      micro: int) -> Optional[Activation]:
        """F: this part's forward of micro-batch `micro`, keeping its graph; the output for the
        next part (None on the last part, which keeps the loss divided by M)."""
        x = activation.leaves(as_activation(h_in), not self.is_first)
        seed = step_seed(self.seed + micro, step, self.index)  # micro-batch 0: bp's seed
        with self.timed("forward", microbatch=micro), seeded(seed, self.device), self._recording():
            out = self.part(*x)
            if self.is_last:
                assert target is not None
                loss = self.loss_fn(out, target) / self.microbatches
                self.results.append(ForwardResult(loss=loss.detach(), logits=out.detach(),
                                                  target=target))
                self.graphs[micro] = (x, (self._scale(loss),))
                return None
        out = as_activation(out)
        self.graphs[micro] = (x, out)
        return activation.detached(out)

    def micro_backward(self, delta: Optional[Deltas], step: int, micro: int) -> Optional[Deltas]:
        """B: the whole backward of micro-batch `micro`, its gradients added to the weights';
        the delta for the previous part."""
        x, out = self.graphs.pop(micro)
        deltas = self._received(delta, micro)
        self._last_backward(micro)
        with self.timed("backward", microbatch=micro):
            if deltas is None:
                out[0].backward()  # the last part: the loss, as bp's backward
            else:
                activation.backward(out, deltas)
        return None if self.is_first else activation.input_deltas(x)

    def input_backward(self, delta: Optional[Deltas], step: int, micro: int) -> Optional[Deltas]:
        """I: only the gradient of this part's input (sent at once); what W needs is saved."""
        x, out = self.graphs[micro]
        deltas = self._received(delta, micro)
        pairs = [(o, d) for o, d in zip(out, deltas or (None,))
                 if o.requires_grad and (d is not None or deltas is None)]
        inputs = [t for t in x if t.requires_grad]
        with self.timed("input_gradient", microbatch=micro):
            grads, self.param_groups[micro] = stage_backward_input(
                [o for o, _ in pairs], None if deltas is None else [d for _, d in pairs],
                inputs, self.part.parameters())
        if self.is_first:
            return None
        by_input = dict(zip(map(id, inputs), grads))
        return tuple(by_input.get(id(t)) if t.requires_grad else None for t in x)

    def weight_backward(self, step: int, micro: int) -> None:
        """W: the weight gradients of micro-batch `micro`, added to the weights'."""
        with self.timed("weight_gradient", microbatch=micro):
            stage_backward_weight(self.part.parameters(), self.param_groups.pop(micro))
        del self.graphs[micro]

    def update(self, step: int) -> ForwardResult:
        """U: the optimizer step on the gradients of all M micro-batches; the last part returns
        the step's loss (the sum of the micro-batches' losses / M) and its logits and targets."""
        assert not self.graphs, f"micro-batches left in flight: {sorted(self.graphs)}"
        self._apply_update()
        if not self.is_last:
            return ForwardResult()
        results, self.results = self.results, []
        return ForwardResult(loss=torch.stack([r.loss for r in results]).sum(),  # type: ignore[misc]
                             logits=torch.cat([r.logits for r in results]),  # type: ignore[misc]
                             target=torch.cat([r.target for r in results]))  # type: ignore[misc]

    # -- helpers
    def _scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def _last_backward(self, micro: int) -> None:
        """Before the backward that completes the step's gradients: data-parallel replicas
        (frzoo.executors.gradient_sum) launch each bucket's sum as it completes in it, once."""
        count = getattr(self.sum_gradients, "count_from_now", None)
        if micro == self.microbatches - 1 and count is not None:
            count()

    def _received(self, delta: Optional[Deltas], micro: int) -> Optional[Deltas]:
        """The delta of micro-batch `micro` (None on the last part: its output is the loss)."""
        if self.is_last:
            return None
        assert delta is not None, f"{type(self).__name__}: no delta for micro-batch {micro}"
        return as_activation(delta)  # type: ignore[arg-type]

    def held_tensors(self) -> List[Tensor]:
        return [t for x, _ in self.graphs.values() for t in x]

    # forward()/backward() are the per-step API of fr/bp/ddg; these run actions instead
    def forward(self, h_in: Input, target: Optional[Tensor], step: int) -> ForwardResult:
        raise TypeError(f"{type(self).__name__} runs a list of actions (runs_actions)")

    def backward(self, delta: Any, step: int) -> Optional[Deltas]:
        raise TypeError(f"{type(self).__name__} runs a list of actions (runs_actions)")


def one_f_one_b(index: int, num_parts: int, microbatches: int, split: bool) -> List[Action]:
    """Part `index`'s 1F1B order; with `split` (zb1), each B of a part that sends a delta as I
    then W: the delta leaves before the weight gradient is computed."""
    warmup = min(num_parts - 1 - index, microbatches)
    order = [Action(FORWARD, m) for m in range(warmup)]
    for m in range(microbatches):
        if warmup + m < microbatches:
            order.append(Action(FORWARD, warmup + m))
        if split and index > 0:
            order += [Action(INPUT_GRAD, m), Action(WEIGHT_GRAD, m)]
        else:  # the first part sends no delta: nothing to gain from splitting its backward
            order.append(Action(BACKWARD, m))
    return order + [Action(UPDATE)]


@register_algorithm("gpipe")
class GPipe(SyncPipeline):
    """All forwards, then all backwards, then the step."""

    @classmethod
    def part_actions(cls, index: int, num_parts: int, microbatches: int) -> List[Action]:
        return ([Action(FORWARD, m) for m in range(microbatches)]
                + [Action(BACKWARD, m) for m in range(microbatches)] + [Action(UPDATE)])


@register_algorithm("1f1b")
class OneFOneB(SyncPipeline):
    """Warm-up of K-1-k forwards, one forward one backward, cool-down (module docstring)."""

    @classmethod
    def part_actions(cls, index: int, num_parts: int, microbatches: int) -> List[Action]:
        return one_f_one_b(index, num_parts, microbatches, split=False)


@register_algorithm("zb1")
class ZeroBubbleH1(SyncPipeline):
    """1F1B with the backward split into I and W, W deferred (module docstring)."""

    @classmethod
    def part_actions(cls, index: int, num_parts: int, microbatches: int) -> List[Action]:
        return one_f_one_b(index, num_parts, microbatches, split=True)
