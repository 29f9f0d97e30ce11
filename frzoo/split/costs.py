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
    """`repeats` measurements of (forward, backward + optimizer step) seconds of each unit
    (module names run in order) on `sample`, in train mode, see :func:`sample_stages`."""
    was_training = model.training
    model.train()
    try:
        return sample_stages(_chained(model, units), sample, repeats)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def sample_stages(stages: Sequence[nn.Module], sample: torch.Tensor,
                  repeats: int = 3) -> List[List[Tuple[float, float]]]:
    """`repeats` measurements of (forward, backward + optimizer step) seconds of each stage,
    each fed what the stage before it returns (the first `sample`), in the mode the stages are
    in, after one warm-up round (allocators, kernels). The first stage's input needs no
    gradient, as a first part's data does not. The measurements go round the stages (stage 1,
    2, ..., then stage 1 again), so a burst of load on a shared machine spoils one measurement
    of a few stages, which their medians discard, rather than every measurement of one stage.

    A stage takes tensors and returns a tensor or a tuple of them: a chain of modules, or a
    stretch of the traced forward whose cuts several tensors cross (frzoo.split.fx_parts.FxPart), so
    cuts inside residual blocks are measured like cuts between them. The update is measured
    too: a part holding most of the parameters (resnet18's layer4) spends tens of ms in it per
    iteration. Several measurements, not one, because a block's time on a shared machine varies
    by a few percent from run to run: their spread says which differences between splits are
    real (frzoo.split.balance)."""
    if repeats < 1:
        raise FrzooError(f"repeats={repeats}: a unit needs at least one measurement.")
    sync = _synchronizer(sample.device)
    fwd: List[List[float]] = [[] for _ in stages]
    bwd: List[List[float]] = [[] for _ in stages]
    for _ in range(repeats + 1):  # the first round warms up allocators and kernels
        h: Tuple[Any, ...] = (sample,)
        for n, stage in enumerate(stages):
            xs = _fresh_inputs(h, grad=n > 0)
            sync()
            start = time.perf_counter()
            ys = _tensors(stage(*xs))
            sync()
            mid = time.perf_counter()
            grown = [y for y in ys if isinstance(y, torch.Tensor) and y.requires_grad]
            torch.autograd.backward(grown, [torch.ones_like(y) for y in grown])
            sync()
            fwd[n].append(mid - start)
            bwd[n].append(time.perf_counter() - mid)
            h = tuple(y.detach() if isinstance(y, torch.Tensor) else y for y in ys)
    out: List[List[Tuple[float, float]]] = []
    for n, stage in enumerate(stages):
        params = [p for p in stage.parameters() if p.grad is not None]
        # the update runs once per iteration in every part, like the backward: count it there
        steps = _optimizer_seconds(params, repeats) if params else [0.0] * repeats
        out.append([(f, b + s) for f, b, s in zip(fwd[n][1:], bwd[n][1:], steps)])
        stage.zero_grad(set_to_none=True)
    return out


def _chained(model: nn.Module, units: Sequence[Sequence[str]]) -> List[nn.Module]:
    """Each unit's modules as one stage (a Sequential over the model's own module objects)."""
    return [nn.Sequential(*[model.get_submodule(n) for n in unit]) for unit in units]


def _tensors(out: Any) -> Tuple[Any, ...]:
    """A stage's output as a tuple (a chain returns one tensor, a traced part one or several)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fresh_inputs(values: Sequence[Any], grad: bool = True) -> Tuple[Any, ...]:
    """Inputs for one measured run: floating-point tensors as new leaves that need a gradient
    unless `grad` is off (a part's backward computes its input gradient too, but the first
    part's), each cloned into a non-leaf so an in-place first operation (ReLU) is allowed; other
    values as they are."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().requires_grad_(grad).clone()
        out.append(v)
    return tuple(out)


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
    """Per unit (module names run in order), see :func:`stage_memory`."""
    return stage_memory(_chained(model, units), sample)


def stage_memory(stages: Sequence[nn.Module], sample: torch.Tensor) -> List[Tuple[float, float, float]]:
    """Per stage (as in :func:`sample_stages`): (bytes autograd saves for its backward, bytes of
    its floating-point inputs, parameter bytes)."""
    out = []
    h: Tuple[Any, ...] = (sample,)
    for stage in stages:
        meter = MemoryMeter(stage, lambda: [])
        with meter.recording():
            ys = _tensors(stage(*_fresh_inputs(h)))
        params = float(sum(p.numel() * p.element_size() for p in stage.parameters()))
        inputs = float(sum(v.numel() * v.element_size() for v in h
                           if isinstance(v, torch.Tensor) and v.is_floating_point()))
        out.append((float(meter.peak), inputs, params))
        h = tuple(y.detach() if isinstance(y, torch.Tensor) else y for y in ys)
        del ys
    return out
