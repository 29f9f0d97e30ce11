"""How one part computes: mixed precision, memory format and compilation (`train.precision`,
`train.memory_format`, `train.compile`).

All three are properties of a part's forward, so they are applied to the part where it is built
(frzoo.pipeline) and the algorithms stay unaware of them: the play, the replay, the last part's
loss, evaluation and the sigma probe all call the same forward.

- bf16: the forward runs under `torch.autocast` on the part's device; parameters, gradients and
  optimizer state stay fp32. Activations and deltas therefore cross between parts in bf16 (half
  the bytes). The last part returns fp32 logits, so the loss is computed in fp32.
- fp16 is refused: its loss scaling must stay correct when a part backpropagates a delta made
  under an older scale (Features Replay's staleness), which frzoo does not implement yet.
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

from typing import Any

import torch
from torch import Tensor, nn

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


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
