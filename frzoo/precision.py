"""How one part computes: mixed precision, memory format and compilation (`train.precision`,
`train.memory_format`, `train.compile`).

All three are properties of a part's forward, so they are applied to the part where it is built
(frzoo.pipeline) and the algorithms stay unaware of them: the play, the replay, the last part's
loss, evaluation and the sigma probe all call the same forward.

- bf16: the forward runs under `torch.autocast` on the part's device; parameters, gradients and
  optimizer state stay fp32. A tensor crosses a cut in the dtype autocast left it in, and its
  delta in the same dtype: a conv net's block output is bf16 (convolution, BatchNorm, ReLU and
  the residual add of two bf16 tensors keep bf16: half the bytes), while a ViT's residual stream
  stays fp32 (the class token and position embedding are fp32 parameters, an add with an fp32
  tensor and LayerNorm give fp32), so between ViT blocks fp32 crosses and inside a block the
  stream (fp32) and the branch (bf16). Measured on the CPU (resnet18, vit_tiny, torch 2.14).
  The last part returns fp32 logits, so the loss is computed in fp32. On a CPU without bf16
  instructions (x86 without AVX512-BF16 or AMX, e.g. AVX2 only) bf16 is emulated and runs
  tens of times slower than fp32 (resnet18: 18-30 s per step against 0.3 s): preparing such a
  part logs one warning per process (:func:`native_cpu_bf16`).
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

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .loss_scale import LossScaler

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features that execute bf16 arithmetic (torch.cpu.get_capabilities' names; x86, then ARM)
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
_log = logging.getLogger("frzoo")
_warned_slow_bf16 = False  # the warning is said once per process, not once per part


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively. Without such instructions oneDNN emulates bf16
    through fp32 conversions, and a bf16 forward runs tens of times slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # a torch without the feature list: ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    found = capabilities()
    return any(found.get(name, False) for name in NATIVE_BF16)


def warn_if_slow_bf16(device: torch.device, precision: str) -> None:
    """One line, once per process, when a part is about to compute bf16 on a CPU that emulates
    it: the run would otherwise be 50-100x slower than fp32 with nothing saying why."""
    global _warned_slow_bf16
    if precision != "bf16" or device.type != "cpu" or _warned_slow_bf16 or native_cpu_bf16():
        return
    _warned_slow_bf16 = True
    _log.warning(
        "train.precision=bf16 on a CPU without bf16 instructions (torch reports CPU capability "
        "%s; no AVX512-BF16 or AMX): bf16 is emulated there, and a ResNet runs about 50-100x "
        "slower than in fp32. Use train.precision=fp32 on this machine.",
        torch.backends.cpu.get_cpu_capability())


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
    warn_if_slow_bf16(device, precision)
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
