"""The zoo's CIFAR ResNets: build through timm, shapes, sizes, chain structure, split presets."""
from __future__ import annotations

import functools
import math

import pytest
import timm
import torch
from torch import nn

import frzoo_registry  # noqa: F401  (registers the zoo architectures)
from frzoo.errors import FrzooError
from frzoo.plugins import ARCHITECTURES, SPLIT_PRESETS
from frzoo_registry.cifar_resnet import ARCH_SPECS, ShortcutA, block_names
from frzoo_registry.split_rule import fr_split_points, stage_block_names

NAMES = sorted(ARCH_SPECS)
PAPER_NAMES = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
               "cifar_resnet110", "cifar_resnet164", "cifar_resnet101", "cifar_resnet152"]


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=num_classes).eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_paper_models_registered():
    for name in PAPER_NAMES:
        assert name in NAMES
        assert name in ARCHITECTURES
        assert timm.is_model(name)


@pytest.mark.parametrize("name", NAMES)
def test_builds_via_timm_with_output_shape(name):
    model = _model(name)
    with torch.no_grad():
        assert model(_x()).shape == (2, 10)
    if name in ("cifar_resnet20", "cifar_resnet164", "cifar_resnet101"):
        m100 = timm.create_model(name, num_classes=100).eval()
        with torch.no_grad():
            assert m100(_x()).shape == (2, 100)
        assert m100.num_classes == 100


@pytest.mark.parametrize("name, low, high", [
    ("cifar_resnet20", 0.26e6, 0.28e6),    # He et al. 2016: 0.27M
    ("cifar_resnet56", 0.84e6, 0.86e6),    # He et al. 2016: 0.85M
    ("cifar_resnet110", 1.70e6, 1.75e6),   # He et al. 2016: 1.7M
    ("cifar_resnet164", 2.55e6, 2.65e6),   # FR paper: about 2.6M (basic blocks, n=27)
    ("cifar_resnet101", 42.0e6, 43.0e6),   # ImageNet R101 (44.5M) less the 7x7 stem and 1000-way fc
    ("cifar_resnet152", 57.5e6, 58.5e6),
])
def test_param_counts(name, low, high):
    assert low <= _params(_model(name)) <= high


@pytest.mark.parametrize("name", NAMES)
def test_root_forward_is_chain_of_children(name):
    model = _model(name)
    assert list(model.parameters(recurse=False)) == []
    assert list(model.buffers(recurse=False)) == []
    x = _x()
    with torch.no_grad():
        expected = model(x)
        h = x
        for child in model.children():
            h = child(h)
        assert torch.equal(h, expected)
        # finer: stem children, then every block, then the head children, one after the other
        h = x
        for child_name, child in model.named_children():
            if child_name.startswith("layer"):
                assert isinstance(child, nn.Sequential)
                for block in child:
                    h = block(h)
            else:
                h = child(h)
        assert torch.equal(h, expected)
        assert torch.equal(model.forward_head(model.forward_features(x)), expected)
    names = [n for n, _ in model.named_children()]
    depth = len(ARCH_SPECS[name][1])
    assert names == (["conv1", "bn1", "act1"] + [f"layer{i}" for i in range(1, depth + 1)]
                     + ["global_pool", "fc"])


@pytest.mark.parametrize("name", NAMES)
def test_split_presets_valid_and_ordered(name):
    model = _model(name)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}  # pre-order = execution
    presets = SPLIT_PRESETS.get(name)
    blocks = block_names(name)
    assert sorted(presets) == [2, 3, 4]
    for k, points in presets.items():
        assert len(points) == k - 1
        assert all(p in order for p in points), points
        assert [order[p] for p in points] == sorted(order[p] for p in points)
        assert len(set(points)) == len(points)
        assert all(p in blocks for p in points)  # every cut is at a block boundary
        assert points == fr_split_points(blocks, k)


def test_split_rule_matches_authors_ceil_rule():
    blocks = stage_block_names([27, 27, 27])  # cifar_resnet164: 81 blocks
    assert fr_split_points(blocks, 2) == ["layer2.14"]             # 41 | 40
    assert fr_split_points(blocks, 3) == ["layer2.0", "layer3.0"]  # 27 | 27 | 27
    assert fr_split_points(blocks, 4) == ["layer1.21", "layer2.15", "layer3.9"]  # 21,21,21,18
    for k in (2, 3, 4):
        size = math.ceil(81 / k)
        assert [blocks.index(p) for p in fr_split_points(blocks, k)] == \
            [i * size for i in range(1, k)]
    # 9 blocks, K=4: chunks of 3 fill only 3 parts -> the even split 3,2,2,2
    assert fr_split_points(stage_block_names([3, 3, 3]), 4) == ["layer2.0", "layer2.2", "layer3.1"]
    assert fr_split_points(blocks, 1) == []
    with pytest.raises(ValueError, match="cannot split"):
        fr_split_points(["a", "b"], 3)


def test_split_k_and_the_zoo_presets_use_one_rule():
    # one implementation: the zoo's presets and `split.k` (models without presets) both use it
    import frzoo.split
    from frzoo_registry import split_rule
    assert split_rule.fr_split_points is frzoo.split.fr_split_points
    assert SPLIT_PRESETS.get("cifar_resnet20")[4] == ["layer2.0", "layer2.2", "layer3.1"]
    # 9 blocks, K=4: ceil(9/4) = 3 fills only 3 parts, so 3, 2, 2, 2 blocks: cut before 3, 5, 7
    model = nn.Sequential()
    model.add_module("stem", nn.Linear(2, 2))
    for stage in (1, 2, 3):
        model.add_module(f"layer{stage}", nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)]))
    model.add_module("fc", nn.Linear(2, 2))
    assert frzoo.split.points_for_k(model, 4) == ["layer2.0", "layer2.2", "layer3.1"]
    assert frzoo.split.points_for_k(model, 4) == fr_split_points(stage_block_names([3, 3, 3]), 4)


def test_option_a_shortcut_and_head_dropout():
    model = timm.create_model("cifar_resnet20", drop_rate=0.2)
    assert isinstance(model.layer2[0].downsample, ShortcutA)
    assert model.layer1[0].downsample is None
    assert not any(True for m in model.modules() if isinstance(m, ShortcutA)
                   for _ in m.parameters())
    names = [n for n, _ in model.named_children()]
    assert names[-3:] == ["global_pool", "head_drop", "fc"]
    assert isinstance(model.head_drop, nn.Dropout) and model.head_drop.p == 0.2
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    big = timm.create_model("cifar_resnet18")
    assert isinstance(big.layer2[0].downsample, nn.Sequential)  # projection: 1x1 conv + BN


def test_in_chans():
    model = timm.create_model("cifar_resnet20", in_chans=1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_unknown_kwarg_and_pretrained_raise():
    with pytest.raises(TypeError, match=r"unknown keyword argument.*'drop_path_rate'.*accepts only"):
        timm.create_model("cifar_resnet56", drop_path_rate=0.1)
    with pytest.raises(TypeError, match="num_classes"):
        timm.create_model("cifar_resnet56", num_classes=2.5)
    with pytest.raises(FrzooError, match="no pretrained weights"):
        timm.create_model("cifar_resnet56", pretrained=True)
    from frzoo.models import create_model
    with pytest.raises(FrzooError, match="bogus"):
        create_model("cifar_resnet20", {"bogus": 1})
