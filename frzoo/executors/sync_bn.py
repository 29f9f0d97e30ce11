"""BatchNorm over the replicas (`distributed.sync_bn`): the statistics of the whole global batch.

:class:`GroupBatchNorm` all-reduces the per-channel sums with the part's group (the R copies of
the part, frzoo.executors.topology.part_groups), in the play and the replay alike (and back
through the backward). torch's SyncBatchNorm refuses CPU tensors in this torch version (it needs
a GPU), so the synchronisation is written with a differentiable dist.all_reduce instead
(:class:`GroupSum`). Without sync_bn each replica normalises with its own rows, and
:func:`broadcast_buffers` gives every copy replica 0's running statistics before evaluation and
checkpoints, as DDP does.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import FrzooError
from .gradient_sum import WaitingFor, no_naming


class GroupSum(torch.autograd.Function):
    """all_reduce (sum) over a process group, differentiable: the gradient of a sum that every
    copy uses is the sum of the copies' gradients, so the backward all-reduces too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any,  # type: ignore[override]
                waiting: WaitingFor) -> Tensor:
        ctx.group, ctx.waiting = group, waiting
        out = tensor.clone()
        with waiting("the other replicas' BatchNorm statistics"):
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:  # type: ignore[override]
        out = grad.contiguous().clone()
        with ctx.waiting("the other replicas' BatchNorm gradients"):
            dist.all_reduce(out, group=ctx.group)
        return out, None, None


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the whole global batch: the per-channel
    sum, count and sum of squared deviations are all-reduced over `group` (two passes, for the
    same accuracy as one process's BatchNorm), differentiably, so the backward sums the
    statistics' gradients over the replicas too. Running statistics are updated from the global
    mean and unbiased variance, as BatchNorm does; evaluation uses them unchanged. It holds the
    BatchNorm it replaces' own parameters and buffers (same names, same objects)."""

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, group: Any,
                 waiting: WaitingFor = no_naming) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine,
                         source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.group = group
        self.waiting = waiting  # names the copies waited for when a sum fails
        self.train(source.training)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        factor = 0.0
        update = self.track_running_stats and self.num_batches_tracked is not None
        if update:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / xf.shape[1]])])
        total = GroupSum.apply(local, self.group, self.waiting)
        count = total[-1]
        mean = total[:-1] / count
        centred = xf - mean.view(shape)
        var = GroupSum.apply((centred * centred).sum(dims), self.group,
                             self.waiting) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if update:
            with torch.no_grad():
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(
                    var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module, group: Any, waiting: WaitingFor = no_naming) -> int:
    """Replace every torch BatchNorm1d/2d/3d in `module` by a GroupBatchNorm over `group`, in
    place; returns how many. A BatchNorm subclass with more in its forward (e.g. timm's
    BatchNormAct2d) would lose that, so it is an error naming the module."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in plain:
            setattr(module, name, GroupBatchNorm(child, group, waiting))
            count += 1
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) \
                and not isinstance(child, GroupBatchNorm):
            raise FrzooError(
                f"distributed.sync_bn=true: module '{name}' is a {type(child).__name__}, a "
                f"BatchNorm with more in its forward; frzoo synchronises torch's BatchNorm1d/2d/3d "
                f"only. Set distributed.sync_bn=false (each replica normalises with its own rows) "
                f"or build the model with torch's BatchNorm.")
        else:
            count += sync_batch_norm(child, group, waiting)
    return count


def broadcast_buffers(module: nn.Module, group: Any, src: int) -> None:
    """Give every copy of a part replica 0's buffers (BatchNorm's running statistics), as DDP
    does: called before evaluation and checkpoints, so evaluation is one model's and a resumed
    run starts from what every replica held."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src, group=group)
