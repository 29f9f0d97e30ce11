"""How one part computes: mixed precision, memory format and compilation (`train.precision`,
`train.memory_format`, `train.compile`).

All three are properties of a part's forward, so they are applied to the part where it is built
(frzoo.pipeline) and the algorithms stay unaware of them: the play, the replay, the last part's
loss, evaluation and the sigma probe all call the same forward.

- bf16: the forward runs under `torch.autocast` on the part's device; parameters, gradients and
  optimizer state stay fp32. Activations and deltas therefore cross between parts in bf16 (half
  the bytes). The last part returns fp32 logits, so the loss is computed in fp32.
- fp16: the same autocast in float16, so activations and deltas cross in fp16. fp16's small
  range needs loss scaling, and under Features Replay a part uses a delta made one iteration
  earlier per link, possibly under another scale: so the scale travels with each delta, each
  part unscales its own gradients with it and skips its step on overflow
  (frzoo.loss_scale.LossScaler, one per part, attached by :func:`loss_scaler`; the rule is in
  docs/algorithm.md, "fp16 loss scaling"). On the CPU, PyTorch 2.14's fp16 autocast runs
  every op of timm's resnet18, the zoo's CIFAR ResNet-56 and -101 and `test_resnet` (the tests
  use it), but 10-25x slower than fp32 (one thread, 32x32 images, 2026-12-03; no fast fp16
  kernels there): fp16 is for GPUs, bf16 is the CPU's half precision.
- channels_last: the part's weights and its input use the NHWC layout (faster convolutions on
  tensor cores and on CPUs with oneDNN). Values are the same; the layout is not sent between
  processes (each part converts its own input).
- compile: `torch.compile` of the part in place (its state_dict keeps the model's names). A part
  compiles one graph for its play (no grad), one for its replay (grad; BatchNorm without running
  statistics under replay_bn=once) and one for evaluation; the last part one for training and
  one for evaluation. A smaller last batch adds graphs for that shape (dynamic=False keeps the
  graphs specialised and fast). Inductor is told to draw random numbers as eager PyTorch does,
  so dropout masks depend on the seed alone and the replay reuses the play's masks.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .loss_scale import LossScaler

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_scaler(precision: str, loss_scale: Any, *, is_last: bool) -> Optional[LossScaler]:
    """The part's share of loss scaling: fp16 only (`loss_scale` is the recipe's
    train.loss_scale section)."""
    if precision != "fp16":
        return None
    return LossScaler(is_last=is_last, init_scale=loss_scale.init,
                      growth_interval=loss_scale.growth_interval)


def prepare_part(part: nn.Module, device: torch.device, *, precision: str, memory_format: str,
                 compile: bool, compile_backend: str, is_last: bool) -> None:
    """Make `part` (already on `device`) compute as the recipe's `train:` section says."""
    channels_last = memory_format == "channels_last"
    dtype = AUTOCAST[precision]
    if channels_last:
        part.to(memory_format=torch.channels_last)
    if dtype is not None or channels_last:
        inner = part.forward

        def forward(*xs: Tensor) -> Any:  # one tensor per tensor crossing the cut
            if channels_last:
                xs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                           for x in xs)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                out = inner(*xs)
            return out.float() if is_last and dtype is not None else out

        part.forward = forward  # type: ignore[method-assign]
    if compile:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True  # dropout masks as in eager: play == replay
        part.compile(backend=compile_backend, dynamic=False)
