"""What a stretch of a model costs: FLOPs, seconds and bytes, measured on a sample.

FLOPs are counted by torch's own ``torch.utils.flop_counter.FlopCounterMode``: 2 per
multiply-add of convolutions, linear layers, matrix products and scaled-dot-product attention,
whether they run inside modules or as functional code; norms, activations and element-wise
operations count 0. The split candidates (`frzoo plan --candidates`) and `split.auto=flops` both
use :func:`counting_flops`, so they agree.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import FrzooError
from ..memory import MemoryMeter


def _attention_flops(query_shape: Sequence[int], key_shape: Sequence[int],
                     value_shape: Sequence[int], *args: Any, out_shape: Any = None,
                     **kwargs: Any) -> int:
    """q @ k^T and attention @ v, 2 FLOPs per multiply-add: the formula torch uses for its CUDA
    attention kernels, for the kernels its table lacks (the CPU one)."""
    *batch, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * queries * keys * (dim + value_dim)


_MISSING_FORMULAS: Dict[Any, Callable[..., int]] = {
    getattr(torch.ops.aten, op): _attention_flops
    for op in ("_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, op)}


@contextlib.contextmanager
def counting_flops() -> Iterator[Callable[[], int]]:
    """Count the FLOPs of everything that runs inside the block; yields a function that returns
    the count so far (read it before and after a piece of work to get that work's FLOPs)."""
    with FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS) as counter:
        yield counter.get_total_flops


def unit_flops(model: nn.Module, units: Sequence[Sequence[str]], sample: torch.Tensor) -> List[float]:
    """Forward FLOPs per sample of each unit (module names run in order), see :func:`counting_flops`."""
    out: List[float] = []
    h = sample
    was_training = model.training
    model.eval()  # the count does not depend on the mode; eval accepts a batch of one
    try:
        with torch.no_grad(), counting_flops() as flops_so_far:
            for unit in units:
                before = flops_so_far()
                for name in unit:
                    h = model.get_submodule(name)(h)
                out.append((flops_so_far() - before) / sample.shape[0])
    finally:
        model.train(was_training)
    return out


def measure_units(model: nn.Module, units: Sequence[Sequence[str]], sample: torch.Tensor,
                  repeats: int = 3) -> List[Tuple[float, float]]:
    """Median (forward, backward + optimizer step) seconds of each unit on `sample`, in train
    mode, in order (:func:`sample_units` has the single measurements)."""
    return [median_and_spread(rows)[0] for rows in sample_units(model, units, sample, repeats)]


def sample_units(model: nn.Module, units: Sequence[Sequence[str]], sample: torch.Tensor,
                 repeats: int = 3) -> List[List[Tuple[float, float]]]:
    """`repeats` measurements of (forward, backward + optimizer step) seconds of each unit on
    `sample`, in train mode, in order, each after one warm-up run (allocators, kernels). The
    update is measured too: a part holding most of the parameters (resnet18's layer4) spends
    tens of ms in it per iteration. Several measurements, not one, because a block's time on a
    shared machine varies by a few percent from run to run: their spread says which differences
    between splits are real (frzoo.split.balance)."""
    if repeats < 1:
        raise FrzooError(f"repeats={repeats}: a unit needs at least one measurement.")
    modules = [[model.get_submodule(n) for n in unit] for unit in units]
    sync = _synchronizer(sample.device)
    was_training = model.training
    model.train()
    out: List[List[Tuple[float, float]]] = []
    h = sample
    try:
        for unit in modules:
            fwd, bwd = [], []
            for _ in range(repeats + 1):  # the first run warms up allocators and kernels
                x = h.detach().requires_grad_(True)
                y = x.clone()  # a non-leaf, so an in-place first module (ReLU) is allowed
                sync()
                start = time.perf_counter()
                for m in unit:
                    y = m(y)
                sync()
                mid = time.perf_counter()
                y.backward(torch.ones_like(y))
                sync()
                end = time.perf_counter()
                fwd.append(mid - start)
                bwd.append(end - mid)
            params = [p for m in unit for p in m.parameters() if p.grad is not None]
            # the update runs once per iteration in every part, like the backward: count it there
            steps = _optimizer_seconds(params, repeats) if params else [0.0] * repeats
            out.append([(f, b + s) for f, b, s in zip(fwd[1:], bwd[1:], steps)])
            with torch.no_grad():
                for m in unit:
                    h = m(h)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return out


def median_and_spread(rows: Sequence[Tuple[float, float]]) -> Tuple[Tuple[float, float],
                                                                      Tuple[float, float]]:
    """(median forward, median backward) of a unit's measurements, and their spread, the
    interquartile range: a difference smaller than the spread may be noise. Not the full range,
    because one measurement in a few on a shared machine is an outlier (a block's backward now
    and then takes five times its usual time), and the median ignores it too."""
    def spread(values: List[float]) -> float:
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q3 - q1

    fwd = [f for f, _ in rows]
    bwd = [b for _, b in rows]
    return (statistics.median(fwd), statistics.median(bwd)), (spread(fwd), spread(bwd))


def module_flops(model: nn.Module, sample: torch.Tensor) -> Dict[str, float]:
    """Forward FLOPs per sample inside each module of `model` (by its name in the model; the
    root is ""), counted on one run of the whole model in eval mode: what a part's modules cost,
    whichever way the part was cut (chain or trace), without running the parts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping=_MISSING_FORMULAS) as counter:
            model(sample)
    finally:
        model.train(was_training)
    root = type(model).__name__
    out: Dict[str, float] = {}
    for key, counts in counter.get_flop_counts().items():
        if key == root or key.startswith(root + "."):
            out[key[len(root) + 1:]] = sum(counts.values()) / sample.shape[0]
    return out


def _optimizer_seconds(params: List[nn.Parameter], repeats: int = 3) -> List[float]:
    """Seconds of an SGD step (momentum, Nesterov, weight decay) over `params`, on copies."""
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.detach().clone()
    opt = torch.optim.SGD(copies, lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.step()  # creates the momentum buffers, as in steady state
    sync = _synchronizer(params[0].device)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work (a GPU runs kernels after the call returns), so a
    wall-clock interval measures the work itself; nothing to wait for on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def unit_memory(model: nn.Module, units: Sequence[Sequence[str]],
                sample: torch.Tensor) -> List[Tuple[float, float, float]]:
    """Per unit: (bytes autograd saves for its backward, bytes of its input, parameter bytes)."""
    out = []
    h = sample
    for unit in units:
        modules = nn.ModuleList([model.get_submodule(n) for n in unit])
        meter = MemoryMeter(modules, lambda: [])
        x = h.detach().requires_grad_(True)
        with meter.recording():
            y = x.clone()
            for m in modules:
                y = m(y)
        params = float(sum(p.numel() * p.element_size() for p in modules.parameters()))
        out.append((float(meter.peak), float(h.numel() * h.element_size()), params))
        h = y.detach()
        del y
    return out
