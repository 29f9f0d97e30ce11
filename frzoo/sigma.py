"""The sufficient direction constant sigma, per part (Features Replay paper, Assumption 1, Fig. 3).

At a probed iteration t, part k's update uses a gradient computed on sample s = t - staleness_k
with stale information (Features Replay: the delta of iteration t-1; DDG: a stored graph). The
probe computes the TRUE backprop gradient at the current weights w^t (all parts) on that same
sample s, before any part updates, so that sigma measures staleness and not sampling noise, and
compares it with the gradient the part then applies. As the authors' measurement did, only
Conv/Linear weights count, and per part it accumulates over an interval:

    sigma_k = sum <true_k, used_k> / sum ||true_k||^2

With one part, or for the last part, the two gradients are the same computation: sigma = 1.
The true gradients run with BatchNorm's running statistics frozen and with each part's RNG
seeded for sample s, so the probe changes nothing in training.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation import as_activation, to_device
from .algorithms.base import PartAlgorithm, frozen_bn_stats, seeded, step_seed


def probed_weights(part: nn.Module) -> Dict[str, nn.Parameter]:
    """Conv and Linear weights of a part, by name."""
    out = {}
    for name, module in part.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


class SigmaProbe:
    """Measures sigma per part every `every` steps; read() returns and resets the sums."""

    def __init__(self, algorithms: Sequence[PartAlgorithm], every: int) -> None:
        self.algorithms = list(algorithms)
        self.every = every
        depth = max(a.staleness for a in self.algorithms) + 1
        self.recent: Deque[Tuple[int, Tensor, Tensor]] = deque(maxlen=depth)  # (step, x, y)
        self.true: Dict[int, List[Tensor]] = {}
        self.dot = [0.0] * len(self.algorithms)
        self.norm = [0.0] * len(self.algorithms)

    def before_step(self, step: int, x: Tensor, y: Tensor) -> None:
        """The training loop's hook, called with each step's batch before the step runs.

        On a probed step the true gradients are taken now, at w^t (the forwards of the step
        change no weight, so before them is the same point as after), and each part's
        `before_update` is set to compare them with the gradient it is about to apply.
        """
        self.recent.append((step, x, y))
        probing = step % self.every == 0
        if probing:
            self.compute_true_gradients(step)
        for k, algo in enumerate(self.algorithms):
            algo.before_update = (lambda a, k=k: self.compare(k, a)) if probing else None

    def compute_true_gradients(self, step: int) -> None:
        """Before any update of iteration `step`: backprop each part's sample (one pass per
        distinct sample serves every part that was trained on it)."""
        samples = {s: (x, y) for s, x, y in self.recent}
        wanted: Dict[int, List[int]] = {}
        for k, algo in enumerate(self.algorithms):  # a part without weights has no sigma
            if step - algo.staleness in samples and probed_weights(algo.part):
                wanted.setdefault(step - algo.staleness, []).append(k)
        self.true = {}
        for sample, parts in wanted.items():
            self.true.update(self._true_gradients(parts, sample, *samples[sample]))

    def _true_gradients(self, parts: List[int], sample: int, x: Tensor,
                        y: Tensor) -> Dict[int, List[Tensor]]:
        saved = [{n: p.grad for n, p in a.part.named_parameters()} for a in self.algorithms]
        h: Any = (x,)
        for algo in self.algorithms:  # activations are tuples, the last part's logits a tensor
            with frozen_bn_stats(algo.part), seeded(step_seed(algo.seed, sample, algo.index), algo.device):
                h = algo.part(*to_device(as_activation(h), algo.device))
        weights = [list(probed_weights(self.algorithms[k].part).values()) for k in parts]
        grads = torch.autograd.grad(F.cross_entropy(h, y.to(h.device)), [w for ws in weights for w in ws])
        for algo, grads_before in zip(self.algorithms, saved):  # leave .grad as it was
            for n, p in algo.part.named_parameters():
                p.grad = grads_before[n]
        out, i = {}, 0
        for k, ws in zip(parts, weights):
            out[k] = [g.detach() for g in grads[i:i + len(ws)]]
            i += len(ws)
        return out

    def compare(self, k: int, algo: PartAlgorithm) -> None:
        """Called with part k's gradients in .grad, just before its optimizer step."""
        true = self.true.pop(k, None)
        if true is None:
            return
        used = [p.grad for p in probed_weights(algo.part).values()]
        if any(g is None for g in used):
            return
        self.dot[k] += float(sum((t.double() * u.double()).sum() for t, u in zip(true, used)))
        self.norm[k] += float(sum((t.double() ** 2).sum() for t in true))

    def read(self, k: int) -> Optional[float]:
        value = self.dot[k] / self.norm[k] if self.norm[k] > 0 else None
        self.dot[k] = self.norm[k] = 0.0
        return value
