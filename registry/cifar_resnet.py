"""The CIFAR ResNets of the Features Replay paper (Huo et al., NeurIPS 2018); timm has none.

Two families, both with a 3x3 stride-1 stem and no max-pool (32x32 inputs):

* He et al. 2016 (Sec. 4.2): basic blocks, 3 stages of n blocks, widths 16/32/64, option-A
  shortcut (strided subsample + zero-padded channels, no parameters): ``cifar_resnet20 .. 110``
  (n = 3, 5, 7, 9, 18) and ``cifar_resnet164`` AS THE FR PAPER DEFINES IT: basic blocks, n = 27,
  about 2.6M parameters (He et al.'s own ResNet-164 uses pre-activation bottlenecks; this is not
  that one).
* ImageNet-style with a CIFAR stem: 3x3 conv 64, four stages of widths 64/128/256/512, projection
  shortcuts (1x1 conv + BN) where the shape changes: ``cifar_resnet101`` / ``cifar_resnet152``
  (bottleneck x4, [3,4,23,3] / [3,8,36,3]) from the paper, plus ``cifar_resnet18`` (basic,
  [2,2,2,2]) and ``cifar_resnet50`` (bottleneck, [3,4,6,3]).

Structure that frzoo's partitioner relies on: the root's forward is exactly its children applied
in registration order (``conv1, bn1, act1, layer1..layerS, global_pool, [head_drop,] fc``); each
``layerS`` is an ``nn.Sequential`` of self-contained blocks, so ``layer3.12`` is a valid cut
point; the root owns no parameters. Default split presets follow the authors' ceil(n/K) rule
(see ``split_rule.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from frzoo.plugins import register_architecture

from .split_rule import fr_split_presets, stage_block_names

__all__ = ["CifarResNet", "BasicBlock", "Bottleneck", "ShortcutA", "ARCH_SPECS",
           "ACCEPTED_KWARGS"]

ACCEPTED_KWARGS = ("num_classes", "in_chans", "drop_rate")


# ---------------------------------------------------------------- blocks
class ShortcutA(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no params)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_channels} -> "
                             f"{out_channels}).")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            # zeros appended after the existing channels, as the official FR code's DownsampleA
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "A":
        return ShortcutA(in_channels, out_channels, stride)
    return _projection(in_channels, out_channels, stride)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 shortcut: str = "A") -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(shortcut, in_channels, out_channels, stride)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 shortcut: str = "B") -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(shortcut, in_channels, out_channels, stride)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + identity)


# ---------------------------------------------------------------- the network
_HEAD = ("global_pool", "head_drop", "fc")


class CifarResNet(nn.Module):
    """A CIFAR ResNet whose forward is exactly the chain of its children (see module doc)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], depths: Sequence[int],
                 widths: Sequence[int], *, stem_width: int, shortcut: str,
                 num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} differ in length.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.depths = tuple(depths)

        # Registration order IS execution order: forward() walks self.children().
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        channels = stem_width
        for stage, (depth, planes) in enumerate(zip(depths, widths), start=1):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and stage > 1) else 1
                blocks.append(block(channels, planes, stride, shortcut=shortcut))
                channels = planes * block.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.num_features = channels
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        if drop_rate > 0:
            self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

        self.pretrained_cfg: Dict[str, Any] = {
            "input_size": (in_chans, 32, 32), "num_classes": num_classes,
            "first_conv": "conv1", "classifier": "fc",
        }
        self.default_cfg = self.pretrained_cfg
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exactly the chain of children in registration order: frzoo's partitioner relies on it.
        for m in self.children():
            x = m(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all stages: the (B, num_features, H, W) map before pooling."""
        for name, m in self.named_children():
            if name in _HEAD:
                break
            x = m(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (+ dropout) (+ fc unless ``pre_logits``) applied to ``forward_features``."""
        for name, m in self.named_children():
            if name not in _HEAD or (pre_logits and name == "fc"):
                continue
            x = m(x)
        return x

    def get_classifier(self) -> nn.Module:
        return self.fc


# ---------------------------------------------------------------- registered architectures
# name -> (block, depths per stage, widths per stage, stem width, shortcut kind, doc)
ARCH_SPECS: Dict[str, tuple] = {
    "cifar_resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), 16, "A", "He et al. 2016, n=3"),
    "cifar_resnet32": (BasicBlock, (5, 5, 5), (16, 32, 64), 16, "A", "He et al. 2016, n=5"),
    "cifar_resnet44": (BasicBlock, (7, 7, 7), (16, 32, 64), 16, "A", "He et al. 2016, n=7"),
    "cifar_resnet56": (BasicBlock, (9, 9, 9), (16, 32, 64), 16, "A", "He et al. 2016, n=9"),
    "cifar_resnet110": (BasicBlock, (18, 18, 18), (16, 32, 64), 16, "A",
                        "He et al. 2016, n=18"),
    "cifar_resnet164": (BasicBlock, (27, 27, 27), (16, 32, 64), 16, "A",
                        "as the FR paper defines it: basic blocks, n=27, ~2.6M params"),
    "cifar_resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 64, "B",
                       "ImageNet ResNet-18 with a CIFAR stem"),
    "cifar_resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 64, "B",
                       "ImageNet ResNet-50 with a CIFAR stem"),
    "cifar_resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), 64, "B",
                        "FR paper's ResNet101: bottleneck [3,4,23,3], CIFAR stem"),
    "cifar_resnet152": (Bottleneck, (3, 8, 36, 3), (64, 128, 256, 512), 64, "B",
                        "FR paper's ResNet152: bottleneck [3,8,36,3], CIFAR stem"),
}


def block_names(arch: str) -> List[str]:
    """Names of the blocks of ``arch`` in execution order (the candidate split points)."""
    return stage_block_names(ARCH_SPECS[arch][1])


def _make_builder(arch: str) -> Callable[..., CifarResNet]:
    block, depths, widths, stem_width, shortcut, doc = ARCH_SPECS[arch]

    def build(**kwargs: Any) -> CifarResNet:
        unknown = sorted(set(kwargs) - set(ACCEPTED_KWARGS))
        if unknown:
            raise TypeError(f"{arch}() got unknown keyword argument(s) {unknown}; it accepts only "
                            f"{', '.join(ACCEPTED_KWARGS)}.")
        num_classes = kwargs.get("num_classes", 10)
        in_chans = kwargs.get("in_chans", 3)
        drop_rate = kwargs.get("drop_rate", 0.0)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise TypeError(f"{arch}(num_classes={num_classes!r}): num_classes must be an int >= 0 "
                            f"(0 = no classifier, the output is the pooled features).")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise TypeError(f"{arch}(in_chans={in_chans!r}): in_chans must be an int >= 1.")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) \
                or not 0.0 <= drop_rate < 1.0:
            raise TypeError(f"{arch}(drop_rate={drop_rate!r}): drop_rate must be a float in "
                            f"[0, 1).")
        return CifarResNet(block, depths, widths, stem_width=stem_width, shortcut=shortcut,
                           num_classes=num_classes, in_chans=in_chans, drop_rate=float(drop_rate))

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (f"CIFAR ResNet '{arch}' ({doc}): {block.__name__} x {list(depths)}, widths "
                     f"{list(widths)}, shortcut {'A (zero-pad)' if shortcut == 'A' else 'B (proj)'}. "
                     f"kwargs: num_classes=10, in_chans=3, drop_rate=0.0.")
    return build


for _arch in ARCH_SPECS:
    register_architecture(_arch, split_presets=fr_split_presets(block_names(_arch)))(
        _make_builder(_arch))
del _arch
